"""The two locking rules CUDA graphs allow, measured on the bucket runner's CPU path
(static buffers, the same code that replays graphs on CUDA): a lock per bucket (each
bucket its own graph pool: what meshserve does) against one lock per model runner (one
shared pool). Two compute threads, as a worker with --max-in-flight 2, run batches of
mixed sizes through one `digits` runner.

    .venv/bin/python bench/graph_locks.py [--batches 2000] [--threads 2]

Prints batches/s (wall), CPU ms per batch, and the share of batches whose forward
started while another batch's was running (the overlap each rule permits). On CPU this measures the
overlap each rule permits, not GPU replay time; on a GPU the same comparison decides
whether two batches of a model can be in flight on the device at once.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path

import torch

from meshserve.model_worker.cuda_graphs import BucketRunner, InputSpec

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(run, batches: list[torch.Tensor], threads: int) -> dict:
    chunks = [batches[i::threads] for i in range(threads)]

    def work(chunk):
        torch.set_num_threads(1)
        for x in chunk:
            run([x])

    workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
    wall, cpu = time.perf_counter(), _cpu_s()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    return {"batches_per_s": round(len(batches) / wall), "cpu_ms_per_batch":
            round(cpu * 1e3 / len(batches), 3), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    net = torch.jit.load(str(ROOT / "models" / "digits" / "2" / "model.pt")).eval()
    spec = [InputSpec("input", torch.float32, (64,))]
    torch.manual_seed(0)
    sizes = [1, 3, 8, 16, 30, 64, 5, 2]
    batches = [torch.rand(sizes[i % len(sizes)], 64) for i in range(args.batches)]

    overlap = {"calls": 0, "overlapped": 0, "active": 0}
    count_lock = threading.Lock()

    def forward(x):
        """The network, counting the calls that start while another one runs."""
        with count_lock:
            overlap["calls"] += 1
            overlap["overlapped"] += overlap["active"] > 0
            overlap["active"] += 1
        try:
            return (net(x),)
        finally:
            with count_lock:
                overlap["active"] -= 1

    per_bucket = BucketRunner(forward, spec, BUCKETS, "cpu", static_buffers=True)
    per_model = BucketRunner(forward, spec, BUCKETS, "cpu", static_buffers=True)
    model_lock = threading.Lock()

    def run_serialized(inputs):
        with model_lock:
            return per_model.run(inputs)

    for runner in (per_bucket, per_model):
        runner.warmup()
    # TorchScript's profiling executor optimizes during the first runs: not measured.
    measure(per_bucket.run, batches, args.threads)
    measure(run_serialized, batches, args.threads)
    results = {}
    for _round in range(3):  # alternate to spread the machine's other load over both
        for name, run in (("lock per bucket", per_bucket.run),
                          ("lock per model", run_serialized)):
            overlap.update(calls=0, overlapped=0)
            result = measure(run, batches, args.threads)
            result["overlapped_pct"] = round(100 * overlap["overlapped"] / overlap["calls"], 1)
            results.setdefault(name, []).append(result)
    print(json.dumps({"threads": args.threads, "batches": args.batches, "rounds": results},
                     indent=1))


if __name__ == "__main__":
    main()
