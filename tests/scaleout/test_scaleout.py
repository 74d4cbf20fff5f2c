"""The mesh scaled out on one machine (`LocalMesh`: every service its own process): two
gateways sharing one port with SO_REUSEPORT, three CPU workers, one batcher, the cache.
Under closed-loop load a worker is SIGKILLed (`up` restarts it) and a gateway SIGTERMed:
every request is answered exactly once, none fails, and the drained gateway exits 0 within
its grace."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import grpc
import numpy as np

from meshserve.common.grpcutil import channel_options
from meshserve.local_mesh import LocalMesh
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import MODELS

# grpc-python's aio server.stop() drops the calls that reached the draining gateway but
# were not yet picked up by its event loop (the client sees CANCELLED; the gateway never
# saw them). They are safe to send again, so the client's channel retries them itself
# (gRPC retry policy): the application code sees no error and no call runs twice.
RETRY = json.dumps({"methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
}]})

CLIENTS = 32
CHANNELS = 8  # separate TCP connections: SO_REUSEPORT spreads connections, not calls
LOAD_S = 20.0
GATEWAY_GRACE_S = 5.0  # the gateway's default --grace-s


def served_ok(child) -> float:
    """Requests a gateway answered OK, from its Prometheus endpoint."""
    port = json.loads(child.port_file.read_text())["metrics"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
               if line.startswith("meshserve_gateway_requests_total{") and 'code="OK"' in line)


def request(rid: str, rng: np.random.Generator) -> pb.ModelInferRequest:
    x = rng.random((1, 64), dtype=np.float32) * 16
    r = pb.ModelInferRequest(model_name="digits", id=rid)
    r.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(x.tobytes())
    r.outputs.add(name="predictions")
    return r


async def scenario(log_path) -> None:
    with open(log_path, "w") as log_file:
        mesh = LocalMesh(str(MODELS), ["cpu"] * 3, port=0, metrics_port=0,
                         log_level="INFO", log_file=log_file, gateways=2)
        try:
            await mesh.start()
            await under_load(mesh)
        finally:
            await mesh.stop()


async def under_load(mesh: LocalMesh) -> None:
    gateways = [c for c in mesh.children if c.name.startswith("gateway-")]
    workers = [c for c in mesh.children if c.name.startswith("worker-")]
    assert len(gateways) == 2 and len(workers) == 3
    channels = [grpc.aio.insecure_channel(
        mesh.gateway_address, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1),
                                       ("grpc.service_config", RETRY)])
        for _ in range(CHANNELS)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + LOAD_S
    sent: list[str] = []
    answered: list[str] = []
    failures: list[str] = []

    async def client(k: int) -> None:
        rng = np.random.default_rng(k)
        stub, n = stubs[k % CHANNELS], 0
        while loop.time() < stop_at:
            rid = f"{k}-{n}"
            n += 1
            sent.append(rid)
            try:
                # wait_for_ready: a call made while the channel reconnects (its gateway
                # drained) waits for the connection instead of failing.
                response = await stub.ModelInfer(request(rid, rng), timeout=30,
                                                 wait_for_ready=True)
                answered.append(response.id)
            except grpc.aio.AioRpcError as e:
                failures.append(f"{rid} at {LOAD_S - (stop_at - loop.time()):.2f}s: "
                                f"{e.code().name} {e.details()}")

    async def faults() -> tuple[int, list[float]]:
        await asyncio.sleep(LOAD_S * 0.3)
        workers[1].proc.send_signal(signal.SIGKILL)
        await asyncio.sleep(LOAD_S * 0.2)
        # both gateways have been taking connections (SO_REUSEPORT spread them)
        served = [await asyncio.to_thread(served_ok, g) for g in gateways]
        gateways[1].proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(gateways[1].proc.wait(), GATEWAY_GRACE_S + 10)
        return code, served

    try:
        results = await asyncio.gather(faults(), *(client(k) for k in range(CLIENTS)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    code, served = results[0]
    print(f"{len(sent)} requests, {len(answered)} answered, {len(failures)} failed; "
          f"OK per gateway before the drain: {served}")
    assert failures == [], failures[:10]
    assert len(sent) > CLIENTS * 10  # the load really ran
    assert sorted(answered) == sorted(sent)  # each answered, under its own id, once
    assert len(set(answered)) == len(answered)
    assert code == 0  # the drained gateway exited cleanly
    assert all(n > 0 for n in served), served
    # the survivors served on to the end; the killed worker was started again, the
    # drained gateway (exit code 0: stopped on purpose) was not
    assert gateways[0].proc.returncode is None
    assert all(w.proc.returncode is None for w in (workers[0], workers[2]))
    assert workers[1].restarts == 1 and gateways[1].restarts == 0


def test_two_gateways_three_workers_ride_through_a_kill_and_a_drain(tmp_path):
    log_path = tmp_path / "mesh.log"
    try:
        asyncio.run(scenario(log_path))
    except BaseException:
        print(log_path.read_text()[-8000:])
        raise
    # every service of the mesh drained on stop (nothing had to be killed)
    text = log_path.read_text()
    print("\n".join(line for line in text.splitlines()
                    if "retrying" in line or "drain" in line or "exited" in line)[-3000:])
    assert "gateway-1 | " in text and "gateway-0 | " in text
    assert "worker-1 exited unexpectedly (killed by SIGKILL); restarting it" in text
    assert "gateway-1 stopped (exit code 0); not restarting it; serving on with 1 other" in text
    assert text.count("draining for up to") == 2  # both gateways drained
