"""A load generator for the v2 gRPC API over our generated stubs (asyncio).

Closed loop: N concurrent callers, each sends its next request when the last one answered.
Open loop: requests start at a fixed rate whatever the answers do. Both are bounded in time
and talk to loopback addresses only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from meshserve.common.grpcutil import channel_options
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc


@dataclass
class RunResult:
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) * 1000 if self.latencies_s else np.array([np.nan])
        total = self.ok + sum(self.errors.values())
        return {
            "requests": total,
            "ok": self.ok,
            "errors": dict(self.errors),
            "throughput_rps": round(self.ok / self.duration_s, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(lat.mean()), 3),
            "cache_hit_ratio": round(self.cache_hits / self.ok, 3) if self.ok else 0.0,
        }


def make_request(model: str, x: np.ndarray, use_cache: bool, version: str = "",
                 outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    if not use_cache:
        request.parameters["cache"].bool_param = False
    return request


class Target:
    """Channels to one gateway (or baseline server); requests are spread over them."""

    def __init__(self, address: str, channels: int = 4):
        self.channels = [
            grpc.aio.insecure_channel(
                address, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self.stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def statistics(self, model: str) -> pb.ModelStatisticsResponse:
        return await self.stubs[0].ModelStatistics(pb.ModelStatisticsRequest(name=model))


def _record(result: RunResult, started: float, response=None, error=None) -> None:
    if error is not None:
        key = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        result.errors[key] = result.errors.get(key, 0) + 1
        return
    result.latencies_s.append(time.perf_counter() - started)
    if response is not None and response.parameters["cache_hit"].bool_param:
        result.cache_hits += 1


async def closed_loop(target: Target, next_request: Callable[[int], pb.ModelInferRequest],
                      concurrency: int, duration_s: float, warmup_s: float = 0.5) -> RunResult:
    """Unary ModelInfer from `concurrency` callers for duration_s (after warmup_s)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    result = RunResult(duration_s)

    async def caller(k: int) -> None:
        stub = target.stubs[k % len(target.stubs)]
        i = k
        while (now := loop.time()) < stop_at:
            t0 = time.perf_counter()
            try:
                response = await stub.ModelInfer(next_request(i), timeout=30)
                if now >= measure_from:
                    _record(result, t0, response)
            except grpc.aio.AioRpcError as e:
                if now >= measure_from:
                    _record(result, t0, error=e)
            i += concurrency

    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return result


async def closed_loop_stream(target: Target, next_request: Callable[[int], pb.ModelInferRequest],
                             concurrency: int, duration_s: float,
                             warmup_s: float = 0.5) -> RunResult:
    """ModelStreamInfer: `concurrency` requests outstanding on one stream per channel."""
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    result = RunResult(duration_s)
    per_stream = [concurrency // len(target.stubs)] * len(target.stubs)
    for i in range(concurrency % len(target.stubs)):
        per_stream[i] += 1

    async def stream(stub, outstanding: int, offset: int) -> None:
        if outstanding == 0:
            return
        call = stub.ModelStreamInfer()
        sent: dict[str, float] = {}
        counter = offset

        async def send_one() -> None:
            nonlocal counter
            request = next_request(counter)
            request.id = str(counter)
            sent[request.id] = time.perf_counter()
            counter += concurrency
            await call.write(request)

        for _ in range(outstanding):
            await send_one()
        while sent:
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            rid = response.infer_response.id
            t0 = sent.pop(rid)
            if loop.time() >= measure_from:
                if response.error_message:
                    result.errors["stream_error"] = result.errors.get("stream_error", 0) + 1
                else:
                    _record(result, t0, response.infer_response)
            if loop.time() < stop_at:
                await send_one()
        await call.done_writing()

    await asyncio.gather(*(stream(s, n, k) for k, (s, n) in
                           enumerate(zip(target.stubs, per_stream, strict=True))))
    return result


async def open_loop(target: Target, next_request: Callable[[int], pb.ModelInferRequest],
                    rate_rps: float, duration_s: float) -> RunResult:
    """Starts requests at a fixed rate (no coordinated omission: the schedule never waits
    for answers)."""
    loop = asyncio.get_running_loop()
    result = RunResult(duration_s)
    start = loop.time()
    count = int(rate_rps * duration_s)
    tasks = []

    async def one(i: int) -> None:
        stub = target.stubs[i % len(target.stubs)]
        t0 = time.perf_counter()
        try:
            response = await stub.ModelInfer(next_request(i), timeout=30)
            _record(result, t0, response)
        except grpc.aio.AioRpcError as e:
            _record(result, t0, error=e)

    for i in range(count):
        delay = start + i / rate_rps - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return result
