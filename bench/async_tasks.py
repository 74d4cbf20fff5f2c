"""Async inference throughput: N digits tasks submitted with SubmitBatch to a local mesh
(every service its own process), durable on a redis-server (and, for comparison, on the
gateway's in-process queue). Reports tasks/s from the first submit to the last task done,
and submit-to-done latency percentiles (the server's submitted/finished timestamps).

    PYTHONPATH=. .venv/bin/python bench/async_tasks.py [--tasks 2000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from meshserve.client import AsyncClient
from meshserve.local_mesh import LocalMesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def measure(address: str, tasks: int, batch: int) -> dict:
    rows = np.random.default_rng(0).uniform(0, 16, (tasks, 1, 64)).astype(np.float32)
    async with AsyncClient(address) as client:
        await client.infer("digits", {"input": rows[0]})  # warm the path
        started = time.perf_counter()
        chunks = [rows[i:i + batch] for i in range(0, tasks, batch)]
        id_lists = await asyncio.gather(*(
            client.submit_batch("digits", [{"input": r} for r in chunk]) for chunk in chunks))
        ids = [tid for chunk in id_lists for tid in chunk]
        submitted_s = time.perf_counter() - started

        async def final(tid):
            return [t async for t in client.watch_task(tid)][-1]
        finals = await asyncio.gather(*(final(t) for t in ids))
        elapsed_s = time.perf_counter() - started
    states = {t.state for t in finals}
    latency_ms = np.array([t.finished_unix_ms - t.submitted_unix_ms for t in finals])
    return {"tasks": tasks, "states": sorted(states), "submit_s": submitted_s,
            "elapsed_s": elapsed_s, "tasks_per_s": tasks / elapsed_s,
            "p50_ms": float(np.percentile(latency_ms, 50)),
            "p99_ms": float(np.percentile(latency_ms, 99)),
            "max_ms": float(latency_ms.max())}


async def run_mode(mode: str, args, tmp: str) -> dict:
    redis_proc, redis_url = start_redis(tmp) if mode == "redis" else (None, "")
    # The gateway reads REDIS_URL from its environment (--redis-url); LocalMesh's children
    # inherit ours.
    os.environ["REDIS_URL"] = redis_url
    log = open(os.path.join(tmp, f"mesh-{mode}.log"), "w")  # noqa: SIM115
    mesh = LocalMesh("models", ["cpu"], redis_url, port=free_port(), metrics_port=free_port(),
                     log_level="WARNING", log_file=log)
    try:
        await mesh.start()
        return await measure(mesh.gateway_address, args.tasks, args.batch)
    finally:
        await mesh.stop()
        log.close()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100, help="tasks per SubmitBatch call")
    p.add_argument("--modes", default="redis,memory")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-async-")
    print(f"async inference: {args.tasks} digits tasks (1 row each), SubmitBatch of "
          f"{args.batch}; mesh: cache + 1 CPU worker + batcher + gateway (1 runner, "
          f"256 tasks in flight); {os.cpu_count()} CPUs")
    for mode in args.modes.split(","):
        r = asyncio.run(run_mode(mode, args, tmp))
        queue = "Redis Streams" if mode == "redis" else "in-process queue"
        print(f"{queue:>16}: {r['tasks_per_s']:7.0f} tasks/s  ({r['tasks']} in "
              f"{r['elapsed_s']:.2f}s; all submitted after {r['submit_s']:.2f}s)  "
              f"submit-to-done p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms  "
              f"max {r['max_ms']:.0f} ms  states {','.join(r['states'])}")


if __name__ == "__main__":
    main()
