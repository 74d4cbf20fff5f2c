"""A caller without a key, or with a narrow one, gets nothing it was not given: real
gateway processes, read as an attacker would."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.protection.conftest import write_keys

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
