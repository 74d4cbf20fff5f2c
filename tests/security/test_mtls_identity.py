"""Zero trust inside: each service's certificate names it, and a port serves only the
callers it names (a worker only the batcher); external clients get certificates from a
separate CA that opens no internal port. Real processes, certificates from
deploy/tls/make-dev-certs.sh."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.errors import ConfigError
from meshserve.common.transport import Transport
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import MODELS, ServiceProcess
from tests.protection.conftest import infer_request
from tests.tls.conftest import make_certs


def tls(certs, name: str) -> list[str]:
    return ["--tls-cert", str(certs.dir / f"{name}.crt"), "--tls-key",
            str(certs.dir / f"{name}.key"), "--tls-ca", str(certs.ca)]


def credentials(certs, name: str, ca=None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or certs.ca).read_bytes(),
        private_key=(certs.dir / f"{name}.key").read_bytes(),
        certificate_chain=(certs.dir / f"{name}.crt").read_bytes())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls-identity")
    certs = make_certs(tmp / "certs")
    internal = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
    worker = ServiceProcess("model_worker", [
        *internal, *tls(certs, "worker"), "--tls-allowed-clients", "meshserve-batcher",
        "--device", "cpu", "--model-repository", str(MODELS)], tmp)
    worker.wait_ready()
    batcher = ServiceProcess("batcher", [
        *internal, *tls(certs, "batcher"),
        "--tls-allowed-clients", "meshserve-gateway,meshserve-async-runner",
        "--model-repository", str(MODELS), "--load", "digits", "--workers", worker.address],
        tmp)
    batcher.wait_ready()
    gateway = ServiceProcess("gateway", [
        *internal, *tls(certs, "gateway"), "--tls-client-ca", str(certs.client_ca),
        "--tls-client-auth", "require", "--model-repository", str(MODELS),
        "--batcher", batcher.address], tmp)
    gateway.wait_ready()
    yield certs, worker, batcher, gateway
    for p in (gateway, batcher, worker):
        p.stop()


def test_a_worker_refuses_a_client_certificate_that_is_not_the_batchers(mesh):
    certs, worker, _batcher, _gateway = mesh
    with grpc.secure_channel(worker.address, credentials(certs, "gateway")) as channel:
        with pytest.raises(grpc.RpcError) as e:
            worker_pb2_grpc.ModelWorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "meshserve-batcher" in e.value.details()
        assert "meshserve-gateway" in e.value.details()
        # Probes stay open to any certificate of the CA.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(worker.address, credentials(certs, "batcher")) as channel:
        status = worker_pb2_grpc.ModelWorkerStub(channel).Status(worker_pb2.StatusRequest(),
                                                            timeout=10)
        assert status.worker_id


def test_the_batcher_serves_gateways_only(mesh):
    certs, _worker, batcher, _gateway = mesh
    from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc

    with grpc.secure_channel(batcher.address, credentials(certs, "worker")) as channel:
        with pytest.raises(grpc.RpcError) as e:
            batcher_pb2_grpc.BatcherStub(channel).ModelStates(
                batcher_pb2.ModelStatesRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_external_clients_have_their_own_ca(mesh):
    """The gateway takes client.crt (client CA) and answers through the whole chain; it
    refuses an internal certificate, and client.crt opens no internal port."""
    certs, worker, _batcher, gateway = mesh
    with grpc.secure_channel(gateway.address, credentials(certs, "client")) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(),
                                                                        timeout=30)
        assert np.frombuffer(response.raw_output_contents[-1], np.int64).shape == (1,)
    for address, name in ((gateway.address, "batcher"), (worker.address, "client")):
        with grpc.secure_channel(address, credentials(certs, name)) as channel:
            with pytest.raises(grpc.RpcError) as e:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_required_client_auth_without_a_ca_refuses_to_start(tmp_path):
    certs = make_certs(tmp_path / "certs")
    with pytest.raises(ConfigError, match="require needs --tls-ca"):
        Transport(tls_cert=str(certs.cert), tls_key=str(certs.key))
    assert Transport(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_client_auth="none")
    with pytest.raises(ConfigError, match="--tls-allowed-clients needs"):
        Transport(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_ca=str(certs.ca),
                  tls_client_auth="optional", tls_allowed_clients=("meshserve-batcher",))


def test_a_certificate_not_on_the_list_makes_a_worker_read_nothing(mesh):
    """A CA-signed certificate that is not the batcher's (here the gateway's) sends 60 MiB
    messages to a worker: to a unary method (refused PERMISSION_DENIED before its message
    is read) and to grpc.health.v1 (answered about the whole server, unread). The worker's
    peak memory does not grow by one of them. Before, each was read and parsed first (the
    identity was checked inside the handler)."""
    import asyncio

    from tests.security.test_hostile_gateway import UNREAD_BOUND, MiB, peak_rss_bytes

    certs, worker, _batcher, _gateway = mesh
    big = b"\x7a" + bytes([0x80, 0x80, 0x80, 0x1e]) + b"\0" * (60 * MiB)  # field 15, 60 MiB
    big_health = health_pb2.HealthCheckRequest(service="s" * (60 * MiB)).SerializeToString()

    async def main():
        async with grpc.aio.secure_channel(
                worker.address, grpc.ssl_channel_credentials(
                    root_certificates=certs.ca.read_bytes(),
                    private_key=(certs.dir / "gateway.key").read_bytes(),
                    certificate_chain=(certs.dir / "gateway.crt").read_bytes()),
                options=[("grpc.max_send_message_length", 100 * MiB)]) as channel:
            status = channel.unary_unary("/meshserve.v1.ModelWorker/Status")
            check = channel.unary_unary("/grpc.health.v1.Health/Check")

            async def refused(data):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await status(data, timeout=60)
                return e.value.code()

            async def healthy(data):
                try:
                    return health_pb2.HealthCheckResponse.FromString(
                        await check(data, timeout=60)).status
                except grpc.aio.AioRpcError as e:
                    return e.code()

            await asyncio.gather(refused(b""), healthy(b""))  # warm up
            await refused(big)
            before = peak_rss_bytes(worker.proc.pid)
            codes = await asyncio.gather(*(refused(big) for _ in range(4)))
            states = await asyncio.gather(*(healthy(big_health) for _ in range(4)))
            return codes, states, peak_rss_bytes(worker.proc.pid) - before

    codes, states, grown = asyncio.run(main())
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 4
    assert states == [health_pb2.HealthCheckResponse.SERVING] * 4
    assert grown < UNREAD_BOUND, f"the worker's peak memory grew by {grown / MiB:.0f} MiB"
