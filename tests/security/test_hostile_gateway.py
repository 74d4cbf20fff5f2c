"""A caller without a key, or with a narrow one, gets nothing it was not given: real
gateway processes, read as an attacker would."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
import pytest

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.protection.conftest import X, metric, write_keys

DIGITS = {"name": "team-digits", "key": "key-digits", "models": ["digits"]}
MiB = 1024 * 1024


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

            # Warm up (the first calls allocate the server's buffers once), then measure.
            await asyncio.gather(*(one(pb.ModelInferRequest(model_name="digits"))
                                   for _ in range(8)))
            before = peak_rss_bytes(keyed_gateway.proc.pid)
            codes = await asyncio.gather(*(one(big) for _ in range(8)))
            return codes, peak_rss_bytes(keyed_gateway.proc.pid) - before

    codes, grown = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
    assert grown < 60 * MiB, f"the gateway's peak memory grew by {grown / MiB:.0f} MiB"


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
