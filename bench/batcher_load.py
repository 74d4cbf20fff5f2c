"""Closed-loop load on the batcher through BatcherClient (no gateway).

Starts one CPU model worker and the batcher as processes on free loopback ports, then runs
single-row digits requests at concurrency 1, 16 and 64 for a few seconds each, printing
throughput, p50/p99 latency and the mean batch size (from Statistics deltas).

    .venv/bin/python bench/batcher_load.py [--seconds 5] [--levels 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshserve.batcher.client import BatcherClient  # noqa: E402
from meshserve.common.tensors import to_pb  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(service: str, args: list[str], tmp: Path, timeout_s: float = 60) -> tuple:
    port_file = tmp / f"{service}.json"
    log = open(tmp / f"{service}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", f"meshserve.{service}", *args, "--host", "127.0.0.1",
         "--metrics-port", "-1", "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{service} did not start:\n{(tmp / f'{service}.log').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())["grpc"]


async def level(client: BatcherClient, concurrency: int, seconds: float) -> dict:
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    inputs = [to_pb("input", x)]
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await client.infer("digits", "2", inputs, ["predictions"], 0, 10.0)
            latencies.append(time.perf_counter() - t0)

    before = (await client.statistics("digits", "2")).models[0]
    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    after = (await client.statistics("digits", "2")).models[0]
    rows = after.inference_count - before.inference_count
    batches = after.execution_count - before.execution_count
    ms = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency, "requests": len(latencies),
        "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)), "mean_batch": rows / max(batches, 1),
    }


async def run(port: int, levels: list[int], seconds: float) -> None:
    client = BatcherClient(f"127.0.0.1:{port}")
    await client.start()
    try:
        for _ in range(50):  # warm the path
            await client.infer("digits", "2", [to_pb("input", np.zeros((1, 64), np.float32))],
                               [], 0, 10.0)
        print(f"{'concurrency':>11} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'mean batch':>10}")
        for c in levels:
            r = await level(client, c, seconds)
            print(f"{r['concurrency']:>11} {r['requests']:>9} {r['throughput']:>9.0f} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_batch']:>10.2f}", flush=True)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each level")
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels")
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            worker, wport = start("model_worker", [
                "--port", str(free_port()), "--device", "cpu", "--model-repository",
                str(ROOT / "models"), "--load", "digits:2"], Path(tmp))
            procs.append(worker)
            batcher, bport = start("batcher", [
                "--port", str(free_port()), "--workers", f"127.0.0.1:{wport}",
                "--model-repository", str(ROOT / "models")], Path(tmp))
            procs.append(batcher)
            print(f"one CPU worker, one batcher, digits v2, single-row requests, "
                  f"{args.seconds:g} s per level, {os.cpu_count()} CPUs")
            asyncio.run(asyncio.wait_for(run(bport, levels, args.seconds),
                                         args.seconds * len(levels) + 60))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in reversed(procs):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
