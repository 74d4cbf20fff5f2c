"""Model worker latency on CPU with `digits`: warmup time per bucket, then the batch
round-trip latency (p50/p99) through gRPC, one batch at a time on one Execute stream.

    .venv/bin/python bench/worker_latency.py [--rounds 300] [--version 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from meshserve.common import grpcutil, tensors
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def start_worker(tmp: Path, version: str) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "worker.ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshserve.model_worker", "--port", "0", "--host", "127.0.0.1",
         "--metrics-port", "-1", "--device", "cpu", "--log-level", "WARNING",
         "--model-repository", str(ROOT / "models"), "--load", f"digits:{version}",
         "--port-file", str(port_file)],
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the worker did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"


async def measure(address: str, version: str, rounds: int) -> None:
    async with grpcutil.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        status = await stub.Status(worker_pb2.StatusRequest())
        for model in status.models:
            print(f"digits v{model.version} load+warmup {model.load_ns / 1e6:.1f} ms, "
                  f"{model.byte_size} bytes, device {status.device}")
            for w in model.warmup:
                print(f"  warmup bucket {w.batch_size:>3}: {w.warmup_ns / 1e3:9.1f} us")

        requests: asyncio.Queue = asyncio.Queue()

        async def send():
            while (item := await requests.get()) is not None:
                yield item

        call = stub.Execute(send())
        rng = np.random.default_rng(0)
        print(f"batch round trip through gRPC, {rounds} rounds each, one batch at a time")
        print(f"{'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'compute p50 ms':>15}")
        batch_id = 0
        for size in (1, 8, 32, 64):
            x = (rng.random((size, 64)) * 16).astype(np.float32)
            latencies, computes = [], []
            for i in range(rounds + 20):  # the first 20 are not counted
                batch_id += 1
                batch = worker_pb2.Batch(batch_id=batch_id, model="digits", version=version,
                                         inputs=[tensors.to_pb("input", x)])
                start = time.perf_counter_ns()
                requests.put_nowait(worker_pb2.ExecuteRequest(batches=[batch]))
                response = await call.read()
                elapsed = time.perf_counter_ns() - start
                result = response.results[0]
                assert result.code == 0 and result.batch_id == batch_id, result.message
                if i >= 20:
                    latencies.append(elapsed / 1e6)
                    computes.append(result.compute_ns / 1e6)
            p50, p99 = np.percentile(latencies, [50, 99])
            print(f"{size:>5} {p50:8.3f} {p99:8.3f} {np.percentile(computes, 50):15.3f}")
        requests.put_nowait(None)
        await call.read()  # end of stream once the worker has answered everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--version", default="2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_worker(Path(tmp), args.version)
        try:
            asyncio.run(measure(address, args.version, args.rounds))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
