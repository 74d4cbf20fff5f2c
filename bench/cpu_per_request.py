"""Where the CPU goes: CPU time per request of each mesh process (and of the load generator)
under a closed loop, from /proc/<pid>/stat before and after. Linux only, loopback only.

    PYTHONPATH=. .venv/bin/python bench/cpu_per_request.py [--concurrency 64] [--duration-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile

import numpy as np

from bench.loadgen import Target, closed_loop, make_request
from meshserve.local_mesh import LocalMesh


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(args: argparse.Namespace) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        mesh = LocalMesh("models", ["cpu"], port=0, metrics_port=-1, log_level="WARNING",
                         log_file=log)
        await mesh.start()
        try:
            target = Target(mesh.gateway_address)
            rows = np.random.default_rng(0).integers(0, 17, size=(512, 64)).astype(np.float32)
            before = {c.name: cpu_s(c.proc.pid) for c in mesh.children}
            mine = own_cpu_s()
            result = await closed_loop(
                target, lambda i: make_request("digits", rows[i % 512][None], use_cache=False),
                args.concurrency, args.duration_s, warmup_s=0)
            n = result.ok
            print(f"digits, cache off, concurrency {args.concurrency}: "
                  f"{result.summary()['throughput_rps']} req/s; CPU per request:")
            for c in mesh.children:
                print(f"  {c.name:<10} {(cpu_s(c.proc.pid) - before[c.name]) / n * 1e6:7.1f} us")
            print(f"  {'loadgen':<10} {(own_cpu_s() - mine) / n * 1e6:7.1f} us")
            await target.close()
        finally:
            await mesh.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=5.0)
    asyncio.run(main(p.parse_args()))
