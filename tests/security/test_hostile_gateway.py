"""A caller without a key, or with a narrow one, gets nothing it was not given: real
gateway processes, read as an attacker would."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.protection.conftest import X, metric, write_keys

DIGITS = {"name": "team-digits", "key": "key-digits", "models": ["digits"]}
MiB = 1024 * 1024

# Reading the eight 60 MiB messages of a test would take at least 480 MiB (750-980 MiB was
# measured before the fixes). Unread, only gRPC's transport buffers them, up to its HTTP/2
# flow-control window per stream: usually 5-20 MiB in all, once 72 MiB in a CI run.
UNREAD_BOUND = 160 * MiB


def peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def keyed_gateway(start_gateway, tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, DIGITS)
    return start_gateway("--api-keys-file", str(keys))


def test_a_large_unauthenticated_message_is_refused_before_it_is_read(keyed_gateway):
    """Eight 60 MiB messages without a key: each refused UNAUTHENTICATED, and the
    gateway's peak memory does not grow by even one of them (never read nor parsed; what
    gRPC buffers is bounded by the HTTP/2 flow-control window, a few MiB per stream).
    Before the check moved ahead of the body, the peak grew by about 750 MiB here."""
    big = pb.ModelInferRequest(model_name="digits")
    big.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    big.raw_input_contents.append(b"\0" * (60 * MiB))

    async def main():
        async with grpc.aio.insecure_channel(
                keyed_gateway.address,
                options=[("grpc.max_send_message_length", 100 * MiB)]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(request):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ModelInfer(request, timeout=60)
                return e.value.code()

            # Warm up (the first calls allocate the server's buffers once, and the first
            # large one gRPC's receive buffers: up to ~90 MiB of peak otherwise), then
            # measure. One large call alone raises a reading server's peak by one message;
            # the eight at once below would raise it by hundreds of MiB more.
            await asyncio.gather(*(one(pb.ModelInferRequest(model_name="digits"))
                                   for _ in range(8)))
            await one(big)
            before = peak_rss_bytes(keyed_gateway.proc.pid)
            codes = await asyncio.gather(*(one(big) for _ in range(8)))
            return codes, peak_rss_bytes(keyed_gateway.proc.pid) - before

    codes, grown = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
    assert grown < UNREAD_BOUND, f"the gateway's peak memory grew by {grown / MiB:.0f} MiB"


def test_a_large_health_check_without_a_key_is_answered_without_reading_it(keyed_gateway):
    """grpc.health.v1 stays open to callers without a key (Kubernetes probes carry none),
    so its body cannot be refused from the metadata: eight 60 MiB Checks (a 60 MiB service
    name) are answered from the server's overall status without the body being read, and
    the gateway's peak memory does not grow by even one of them. Before, each was read and
    parsed (the name looked up: NOT_FOUND) and the peak grew by hundreds of MiB."""
    big = health_pb2.HealthCheckRequest(service="s" * (60 * MiB))

    async def main():
        async with grpc.aio.insecure_channel(
                keyed_gateway.address,
                options=[("grpc.max_send_message_length", 100 * MiB)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def one(request):
                try:
                    return (await stub.Check(request, timeout=60)).status
                except grpc.aio.AioRpcError as e:
                    return e.code()

            # Warm up as above (the first large receive allocates gRPC's buffers once).
            await asyncio.gather(*(one(health_pb2.HealthCheckRequest()) for _ in range(8)))
            await one(big)
            before = peak_rss_bytes(keyed_gateway.proc.pid)
            answers = await asyncio.gather(*(one(big) for _ in range(8)))
            return answers, peak_rss_bytes(keyed_gateway.proc.pid) - before

    answers, grown = asyncio.run(main())
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 8
    assert grown < UNREAD_BOUND, f"the gateway's peak memory grew by {grown / MiB:.0f} MiB"


def test_health_without_a_key_is_about_the_whole_server(keyed_gateway):
    """A keyless Check or Watch is answered for service "" (what probes ask); a caller
    with a key gets grpc.health.v1 exactly (an unknown service: NOT_FOUND)."""
    async def main():
        async with grpc.aio.insecure_channel(keyed_gateway.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            unknown = health_pb2.HealthCheckRequest(service="no.such.Service")
            keyless = await stub.Check(unknown, timeout=30)
            bad_key = await stub.Check(unknown, timeout=30,
                                       metadata=(("authorization", "Bearer wrong"),))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Check(unknown, timeout=30,
                                 metadata=(("authorization", "Bearer key-digits"),))
            watch = stub.Watch(unknown, timeout=30)
            first = await watch.read()
            watch.cancel()
            return keyless.status, bad_key.status, e.value.code(), first.status

    serving = health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(main()) == (serving, serving, grpc.StatusCode.NOT_FOUND, serving)


def test_amplifying_messages_are_refused_before_they_are_parsed(start_gateway):
    """A caller the gateway serves (here: no keys) sends 30 MiB of packed 1-byte `shape`
    varints (8-byte ints once parsed), then 30 MiB of empty `inputs` (a message object
    each): both INVALID_ARGUMENT, refused on their bytes (gateway/wire.py). Their bytes are
    received (gRPC's buffer and Python's copy: 2 x 30 MiB each, 40-80 MiB of peak here),
    but never parsed: parsed, they raised the peak by about 500 MiB and 1.3 GiB."""
    gateway = start_gateway()
    dims = pb.ModelInferRequest(model_name="digits")
    dims.inputs.add(name="input", datatype="FP32", shape=[1] * (30 * MiB))
    empty = pb.ModelInferRequest(model_name="digits")
    empty.inputs.extend([pb.ModelInferRequest.InferInputTensor()] * (15 * MiB))
    bombs = [dims.SerializeToString(), empty.SerializeToString()]
    warm = pb.ModelInferRequest(model_name="digits", id="w" * (30 * MiB)).SerializeToString()

    async def main():
        async with grpc.aio.insecure_channel(
                gateway.address, options=[("grpc.max_send_message_length", 100 * MiB)]) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=None, response_deserializer=None)

            async def one(data):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await infer(data, timeout=60)
                return e.value.code(), e.value.details()

            await one(warm)  # gRPC's receive buffers for a 30 MiB message, once
            before = peak_rss_bytes(gateway.proc.pid)
            answers = [await one(data) for data in bombs]
            return answers, peak_rss_bytes(gateway.proc.pid) - before

    answers, grown = asyncio.run(main())
    assert [code for code, _ in answers] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "more than 16 dimensions" in answers[0][1]
    assert "more than 64 inputs" in answers[1][1]
    assert grown < 200 * MiB, f"the gateway's peak memory grew by {grown / MiB:.0f} MiB"


def requests_ok(gateway) -> float:
    """meshserve_gateway_requests_total of code OK, every model."""
    url = f"http://127.0.0.1:{gateway.ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("meshserve_gateway_requests_total{") and 'code="OK"' in line)


def settled(read, limit: float) -> float:
    """read() once it stops changing (or reaches limit): the work a stream caused."""
    last, same = read(), 0
    while same < 4 and last < limit:
        time.sleep(0.5)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


def test_a_stream_that_never_reads_stays_bounded(start_gateway):
    """3000 requests (of 64 rows: 5.7 KB responses) on a stream whose client never reads:
    the gateway stops taking requests once its small buffers and the HTTP/2 windows are
    full (the client's writes wait) instead of computing them all and queueing every
    response in memory."""
    gateway = start_gateway("--max-concurrent-requests", "8", "--max-stream-concurrency", "4")
    n = 3000
    rows = np.tile(X, (64, 1))

    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=120)

            async def write():
                for i in range(n):
                    request = pb.ModelInferRequest(model_name="digits", id=str(i))
                    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
                    request.raw_input_contents.append(rows.tobytes())
                    request.parameters["cache"].bool_param = False
                    await call.write(request)

            writer = asyncio.create_task(write())
            done = await asyncio.to_thread(settled, lambda: requests_ok(gateway), n)
            inflight = metric(gateway, "meshserve_gateway_inflight_requests")
            writer.cancel()
            call.cancel()
            return done, inflight

    done, inflight = asyncio.run(main())
    assert 0 < done < n // 2, f"{done} of {n} requests computed for a client that never read"
    assert inflight <= 8


def oversized_requests() -> dict[str, pb.ModelInferRequest]:
    def base():
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
        r.raw_input_contents.append(X.tobytes())
        return r

    out = {}
    out["id"] = base()
    out["id"].id = "i" * MiB
    out["model_name"] = base()
    out["model_name"].model_name = "m" * MiB
    out["parameters"] = base()
    for i in range(1000):
        out["parameters"].parameters[f"p{i}"].int64_param = i
    out["parameter"] = base()
    out["parameter"].parameters["note"].string_param = "v" * MiB
    out["input name"] = base()
    out["input name"].inputs[0].name = "n" * MiB
    out["dims"] = base()
    out["dims"].inputs[0].shape[:] = [1] * 100_000
    out["outputs"] = base()
    for i in range(1000):
        out["outputs"].outputs.add(name=f"o{i}")
    return out


def test_ids_names_parameters_and_dims_are_bounded(start_gateway):
    """Each bound: INVALID_ARGUMENT with a short message, on ModelInfer and on a stream
    (whose error response echoes at most 256 characters of the id)."""
    gateway = start_gateway()
    requests = oversized_requests()

    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for what, request in requests.items():
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ModelInfer(request, timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
                assert len(e.value.details()) < 300, what
            responses = [r async for r in stub.ModelStreamInfer(iter(requests.values()),
                                                               timeout=60)]
            assert len(responses) == len(requests)
            assert all(r.error_message for r in responses)
            assert max(len(r.infer_response.id) for r in responses) == 256

    asyncio.run(main())
    gateway.output()
    log = gateway.log_path.read_text()
    assert max(len(line) for line in log.splitlines()) < 10_000


def test_a_newline_in_a_model_name_is_escaped_in_the_log(start_gateway):
    gateway = start_gateway()
    request = pb.ModelInferRequest(model_name="digits\nFORGED 2026 ERROR all keys leaked")
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.tobytes())

    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            return e.value.code()

    assert asyncio.run(main()) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    gateway.output()
    log = gateway.log_path.read_text()
    assert "FORGED" in log  # the attempt is logged...
    assert not any(line.startswith("FORGED") for line in log.splitlines())  # ...on its line


def test_reflection_and_the_index_are_behind_the_key_and_filtered(start_gateway, tmp_path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    keys = tmp_path / "keys.json"
    write_keys(keys, DIGITS, {"name": "ops", "key": "key-ops", "models": ["*"]},
               {"name": "reader", "key": "key-reader", "models": ["digits"], "scopes": ["infer"]})
    gateway = start_gateway("--api-keys-file", str(keys))

    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def index(key):
                reply = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30,
                                                   metadata=(("authorization", f"Bearer {key}"),))
                return {m.name for m in reply.models}

            assert await index("key-reader") == {"digits"}
            assert {"digits", "seqpool"} <= await index("key-ops")

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def services(metadata=None):
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                async for reply in reflect.ServerReflectionInfo(iter([request]), timeout=30,
                                                                metadata=metadata):
                    return {s.name for s in reply.list_services_response.service}

            # Refused from the metadata alone: the call ends before the client writes. (Writing
            # first races the server's refusal: the client's own send then fails as INTERNAL.)
            refused = reflect.ServerReflectionInfo(timeout=30)
            assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
            listed = await services((("authorization", "Bearer key-reader"),))
            assert "inference.GRPCInferenceService" in listed

    asyncio.run(main())
