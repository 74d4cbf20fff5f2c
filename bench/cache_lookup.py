"""Lookup latency of the cache service over gRPC (unary Lookup, all hits), against a
redis-server and against the in-memory backend. Loopback only, bounded in time.

    .venv/bin/python bench/cache_lookup.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc

VALUE = b"\x00" * 512  # a small serialized CachedOutputs stand-in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
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
    proc.kill()
    sys.exit("redis-server did not start")


def start_cache(tmp: Path, redis_url: str) -> tuple[subprocess.Popen, str]:
    port_file = tmp / f"cache-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshserve.cache", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--log-level", "WARNING", "--redis-url", redis_url,
         "--port-file", str(port_file)])
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("the cache service did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"


def keys(n: int, offset: int) -> list[cache_pb2.CacheKey]:
    return [cache_pb2.CacheKey(model="bench", version="1", digest=(offset + i).to_bytes(32, "big"))
            for i in range(n)]


async def measure(address: str, calls: int) -> dict[int, tuple[float, float]]:
    figures = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        for n in (1, 32):
            batch = keys(n, offset=n * 1000)
            gen = (await stub.Lookup(cache_pb2.LookupRequest(keys=batch))).results[0].generation
            stored = await stub.Store(cache_pb2.StoreRequest(entries=[
                cache_pb2.StoreEntry(key=k, value=VALUE, generation=gen) for k in batch]))
            assert stored.stored == n, stored
            request = cache_pb2.LookupRequest(keys=batch)
            for _ in range(30):  # warm-up
                await stub.Lookup(request, timeout=5)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                response = await stub.Lookup(request, timeout=5)
                times.append(time.perf_counter() - start)
                assert all(r.hit for r in response.results)
            us = np.array(times) * 1e6
            figures[n] = (float(np.percentile(us, 50)), float(np.percentile(us, 99)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp)
        procs = [redis_proc]
        try:
            print(f"cache Lookup over gRPC (unary, loopback, all hits, {len(VALUE)} B values), "
                  f"{args.calls} calls each")
            print(f"{'backend':<8} {'keys':>4} {'p50 us':>9} {'p99 us':>9}")
            for backend, url in (("redis", redis_url), ("memory", "")):
                cache_proc, address = start_cache(tmp, url)
                procs.append(cache_proc)
                figures = asyncio.run(asyncio.wait_for(measure(address, args.calls), 120))
                for n, (p50, p99) in figures.items():
                    print(f"{backend:<8} {n:>4} {p50:>9.0f} {p99:>9.0f}")
                cache_proc.terminate()
                cache_proc.wait(15)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
