"""meshserve: an inference mesh that serves PyTorch models over gRPC."""

__version__ = "0.1.0"
