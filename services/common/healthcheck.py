"""`python -m meshserve.common.healthcheck --port 8011`: one grpc.health.v1 Check against a
service on this host, over TLS (mTLS) with the service's own MESHSERVE_TLS_* files.
Exit 0 when SERVING, 1 otherwise: an exec probe for pods whose gRPC port speaks TLS, where
the kubelet's native grpc probe (plaintext only) cannot be used."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common import grpcutil, transport
from meshserve.common.settings import Flags


def check(port: int, settings: transport.Transport, server_name: str, service: str = "",
          timeout_s: float = 2.0) -> bool:
    target = f"127.0.0.1:{port}"
    if settings.client_tls:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, grpcutil.channel_credentials(settings), options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"health check of {target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"health check of {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
    return serving


def main(argv: list[str] | None = None) -> int:
    f = Flags("python -m meshserve.common.healthcheck", __doc__.splitlines()[0])
    f.add("--port", int, 0, "the service's gRPC port on 127.0.0.1")
    f.add("--service", str, "", "health service name (empty: the whole server)")
    f.add("--server-name", str, "localhost",
          "name the service's certificate carries (checked instead of 127.0.0.1)")
    f.add("--timeout-s", float, 2.0, "give up after this long")
    transport.add_flags(f)
    a = f.parse(argv)
    if not 0 < a.port < 65536:
        f.parser.error("--port: the service's gRPC port is required")
    settings = transport.from_args(f, a)
    return 0 if check(a.port, settings, a.server_name, a.service, a.timeout_s) else 1


if __name__ == "__main__":
    sys.exit(main())
