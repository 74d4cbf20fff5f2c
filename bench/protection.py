"""The per-request cost of the gateway's protection: API key + rate limits vs none.

    PYTHONPATH=. .venv/bin/python bench/protection.py [--duration-s 5] [--rounds 2]

Starts two meshes side by side (`LocalMesh`: cache, one CPU model worker, batcher, gateway):
one plain, one whose gateway has --api-keys-file (one key allowed every model, with a
per-key token bucket) and --model-rate-limits (a per-model bucket), both limits far too
high to refuse anything. Then alternates between them, `rounds` times: p50 latency of unary
ModelInfer at concurrency 1, and throughput at concurrency 16 (prediction cache off). Prints
both and the difference (the medians over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.loadgen import make_request
from meshserve.common import auth
from meshserve.common.grpcutil import channel_options
from meshserve.local_mesh import LocalMesh
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-" + "k" * 32


async def closed_loop(address: str, metadata, concurrency: int, duration_s: float,
                      warmup_s: float = 1.0, channels: int = 4) -> dict:
    """Unary ModelInfer from `concurrency` callers; p50 and throughput after the warmup."""
    chans = [grpc.aio.insecure_channel(
        address, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in chans]
    inputs = np.random.default_rng(0).random((1024, 1, 64), dtype=np.float32) * 16
    requests = [make_request("digits", x, False) for x in inputs]
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    latencies: list[float] = []
    errors = 0

    async def caller(k: int) -> None:
        nonlocal errors
        stub, i = stubs[k % len(stubs)], k
        while (now := loop.time()) < stop_at:
            t0 = time.perf_counter()
            try:
                await stub.ModelInfer(requests[i % len(requests)], metadata=metadata, timeout=30)
                if now >= measure_from:
                    latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                errors += 1
            i += concurrency

    try:
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in chans))
    return {"p50_ms": float(np.percentile(np.array(latencies) * 1000, 50)),
            "throughput_rps": len(latencies) / duration_s, "errors": errors}


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-bench-protection-"))
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{
        "name": "bench", "sha256": auth.hash_key(KEY), "models": ["*"],
        "rate_per_s": 1e9, "burst": 1e9}]}))
    protected_flags = ("--api-keys-file", str(keys), "--model-rate-limits", "digits=1e9:1e9")
    log_path = tmp / "mesh.log"
    with open(log_path, "w") as log_file:
        plain = LocalMesh(str(ROOT / "models"), ["cpu"], port=0, metrics_port=-1,
                          log_level="WARNING", log_file=log_file)
        guarded = LocalMesh(str(ROOT / "models"), ["cpu"], port=0, metrics_port=-1,
                            log_level="WARNING", log_file=log_file,
                            gateway_flags=protected_flags)
        try:
            await plain.start()
            await guarded.start()
            setups = {"off": (plain.gateway_address, None),
                      "on": (guarded.gateway_address, (("authorization", f"Bearer {KEY}"),))}
            results: dict[str, dict[str, list[float]]] = {
                name: {"p50_ms": [], "throughput_rps": [], "errors": []} for name in setups}
            for r in range(args.rounds):
                for name, (address, metadata) in setups.items():
                    one = await closed_loop(address, metadata, 1, args.duration_s)
                    many = await closed_loop(address, metadata, 16, args.duration_s)
                    results[name]["p50_ms"].append(one["p50_ms"])
                    results[name]["throughput_rps"].append(many["throughput_rps"])
                    results[name]["errors"].append(one["errors"] + many["errors"])
                    print(f"[protection] round {r + 1} auth+limits {name:>3}: "
                          f"p50 (c=1) {one['p50_ms']:.3f} ms, throughput (c=16) "
                          f"{many['throughput_rps']:.1f} req/s, errors "
                          f"{one['errors'] + many['errors']}", flush=True)
        finally:
            await guarded.stop()
            await plain.stop()
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    off, on = med["off"], med["on"]
    print(f"[protection] machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%dT%H:%M:%S')}; "
          f"median of {args.rounds} round(s) of {args.duration_s:.0f}s each (logs: {log_path})")
    print(f"[protection] p50 latency at concurrency 1:  off {off['p50_ms']:.3f} ms, "
          f"on {on['p50_ms']:.3f} ms, difference {on['p50_ms'] - off['p50_ms']:+.3f} ms "
          f"({(on['p50_ms'] / off['p50_ms'] - 1) * 100:+.1f}%)")
    print(f"[protection] throughput at concurrency 16: off {off['throughput_rps']:.1f} req/s, "
          f"on {on['throughput_rps']:.1f} req/s, difference "
          f"{on['throughput_rps'] - off['throughput_rps']:+.1f} req/s "
          f"({(on['throughput_rps'] / off['throughput_rps'] - 1) * 100:+.1f}%)")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/protection.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=2, help="alternations of off and on")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
