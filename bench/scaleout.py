"""Throughput of the mesh with 1 gateway, then 2 gateways sharing the port (SO_REUSEPORT).

    PYTHONPATH=. .venv/bin/python bench/scaleout.py [--concurrency 64] [--duration-s 8]

Each run starts the whole mesh (`LocalMesh`: cache, model workers, batcher, N gateways),
drives closed-loop unary ModelInfer at the given concurrency (prediction cache off, random
inputs) over many client connections (the kernel spreads connections, not calls, over
the gateways), then stops it. Prints both throughputs and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadgen import Target, closed_loop, make_request
from meshserve.local_mesh import LocalMesh

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(gateways: int, workers: int, concurrency: int, duration_s: float,
                  channels: int, log_file) -> dict:
    mesh = LocalMesh(str(ROOT / "models"), ["cpu"] * workers, port=free_port(),
                     metrics_port=-1, log_level="WARNING", log_file=log_file,
                     gateways=gateways)
    inputs = np.random.default_rng(0).random((4096, 1, 64), dtype=np.float32) * 16
    try:
        await mesh.start()
        target = Target(mesh.gateway_address, channels=channels)
        try:
            result = await closed_loop(
                target, lambda i: make_request("digits", inputs[i % len(inputs)], False),
                concurrency, duration_s, warmup_s=1.0)
        finally:
            await target.close()
    finally:
        await mesh.stop()
    return {"gateways": gateways, **result.summary()}


async def run(args: argparse.Namespace) -> None:
    log_path = Path(tempfile.gettempdir()) / "meshserve-bench-scaleout.log"
    results = []
    with open(log_path, "w") as log_file:
        for gateways in (1, 2):
            print(f"[scaleout] {gateways} gateway(s), {args.workers} CPU worker(s), "
                  f"concurrency {args.concurrency}, {args.duration_s:.0f}s "
                  f"(logs: {log_path})", flush=True)
            results.append(await measure(gateways, args.workers, args.concurrency,
                                         args.duration_s, args.channels, log_file))
            print(json.dumps(results[-1]), flush=True)
    one, two = (r["throughput_rps"] for r in results)
    print(f"[scaleout] machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    print(f"[scaleout] 1 gateway:  {one:8.1f} req/s  (p50 {results[0]['p50_ms']} ms, "
          f"p99 {results[0]['p99_ms']} ms, errors {results[0]['errors']})")
    print(f"[scaleout] 2 gateways: {two:8.1f} req/s  (p50 {results[1]['p50_ms']} ms, "
          f"p99 {results[1]['p99_ms']} ms, errors {results[1]['errors']})")
    print(f"[scaleout] ratio 2/1: {two / one:.2f}" if one else "[scaleout] ratio: n/a")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/scaleout.py", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--workers", type=int, default=1, help="CPU model workers in both runs")
    p.add_argument("--channels", type=int, default=16,
                   help="client connections (SO_REUSEPORT balances connections)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
