"""Code shared by every meshserve service: settings, errors, tensors, the model repository."""
