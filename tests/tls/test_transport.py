"""grpcutil's TLS helpers on real in-process servers: client-certificate modes, server
verification, the certificate-name override, and the Transport settings' validation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common import grpcutil
from meshserve.common.errors import ConfigError
from meshserve.common.transport import Transport
from tests.tls.conftest import make_certs


def server_transport(certs, client_auth: str) -> Transport:
    return Transport(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_ca=str(certs.ca),
                     tls_client_auth=client_auth)


async def check(target: str, transport: Transport, server_name: str = "") -> int:
    channel = grpcutil.channel(target, transport, server_name=server_name)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status
    finally:
        await channel.close()


async def serve(transport: Transport):
    server, port, health = grpcutil.new_server("127.0.0.1:0", [], transport=transport)
    await server.start()
    await grpcutil.set_serving(health, [], True)
    return server, f"127.0.0.1:{port}"


SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client_auth, without_cert_ok", [
    ("require", False), ("optional", True), ("none", True)])
def test_client_certificate_modes(certs, client_auth, without_cert_ok):
    asyncio.run(_client_certificate_modes(certs, client_auth, without_cert_ok))


async def _client_certificate_modes(certs, client_auth, without_cert_ok):
    server, target = await serve(server_transport(certs, client_auth))
    try:
        with_cert = Transport(tls_cert=str(certs.cert), tls_key=str(certs.key),
                              tls_ca=str(certs.ca))
        assert await check(target, with_cert) == SERVING
        ca_only = Transport(tls_ca=str(certs.ca))
        if without_cert_ok:
            assert await check(target, ca_only) == SERVING
        else:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await check(target, ca_only)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_server_certificate_is_verified(certs, tmp_path):
    """A client trusting another CA refuses the server; the name checked is the target's,
    or the override given for IP targets resolved from a DNS name."""
    asyncio.run(_server_certificate_is_verified(certs, tmp_path))


async def _server_certificate_is_verified(certs, tmp_path):
    server, target = await serve(server_transport(certs, "require"))
    other = make_certs(tmp_path / "other")
    mine = Transport(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_ca=str(certs.ca))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await check(target, Transport(tls_cert=str(other.cert), tls_key=str(other.key),
                                          tls_ca=str(other.ca)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await check(target, mine, server_name="meshserve-worker") == SERVING
        with pytest.raises(grpc.aio.AioRpcError):
            await check(target, mine, server_name="not-in-the-certificate")
    finally:
        await server.stop(None)


def test_transport_validation(certs, tmp_path):
    assert not Transport().server_tls and not Transport().client_tls
    with pytest.raises(ConfigError, match="go together"):
        Transport(tls_cert=str(certs.cert))
    with pytest.raises(ConfigError, match="no such file"):
        Transport(tls_ca=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="--tls-client-auth"):
        Transport(tls_client_auth="sometimes")
    with pytest.raises(ConfigError, match="--compression"):
        Transport(compression="brotli")


def test_flags_and_environment(certs):
    from meshserve.batcher.config import from_args as batcher_args
    from meshserve.gateway.config import from_args as gateway_args

    gateway = gateway_args(["--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
                            "--compression", "gzip", "--trace-sample-ratio", "0.5"])
    assert gateway.transport.tls_client_auth == "none"  # the gateway's default
    assert gateway.transport.compression == "gzip" and gateway.trace_sample_ratio == 0.5
    batcher = batcher_args([], env={"MESHSERVE_TLS_CERT": str(certs.cert),
                                    "MESHSERVE_TLS_KEY": str(certs.key),
                                    "MESHSERVE_TLS_CA": str(certs.ca),
                                    "MESHSERVE_CHANNEL_COMPRESSION": "gzip"})
    assert batcher.transport.tls_client_auth == "require"  # internal services' default
    assert batcher.transport.server_tls and batcher.transport.channel_compression == "gzip"
    with pytest.raises(SystemExit):
        batcher_args(["--tls-cert", str(certs.cert)], env={})
