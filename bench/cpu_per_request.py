"""Where the CPU goes: CPU microseconds per inference of each mesh process (and of the load
generator) under a closed loop, from /proc/<pid>/stat before and after, and the mean items
per message on every internal hop (the meshserve_hop_* metrics of the gateway and the
batcher, read before and after). CPU time is robust to a shared machine where throughput
is not. Linux only, loopback only. `make bench` runs it; alone:

    PYTHONPATH=. .venv/bin/python bench/cpu_per_request.py [--concurrency 64] [--duration-s 5]
        [--inputs distinct|repeated|uncached]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import urllib.request
from collections.abc import Callable

import numpy as np

from bench.loadgen import Target, closed_loop, make_request
from meshserve.common.hops import HopCount, parse_metrics
from meshserve.local_mesh import LocalMesh


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hop_counts(mesh: LocalMesh) -> dict[str, HopCount]:
    """Every meshserve_hop_* counter of the mesh's processes (0 for one that has none)."""
    out: dict[str, HopCount] = {}
    for child in mesh.children:
        port = json.loads(child.port_file.read_text()).get("metrics")
        if not port:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for hop, count in parse_metrics(r.read().decode()).items():
                total = out.setdefault(hop, HopCount())
                total.messages += count.messages
                total.items += count.items
    return out


def requests_for(inputs: str) -> Callable[[int], object]:
    """distinct: a new input per request, cache on (every request a miss); repeated: 8
    inputs over and over (hits once warm); uncached: the cache parameter off."""
    rows = np.random.default_rng(0).integers(0, 17, size=(512, 64)).astype(np.float32)
    if inputs == "distinct":
        offset = iter(range(1, 10**12))
        return lambda i: make_request("digits", rows[i % 512][None] + next(offset) * 1e-3,
                                      use_cache=True)
    if inputs == "repeated":
        return lambda i: make_request("digits", rows[i % 8][None], use_cache=True)
    return lambda i: make_request("digits", rows[i % 512][None], use_cache=False)


async def measure(mesh: LocalMesh, target: Target, next_request, concurrency: int,
                  duration_s: float) -> dict:
    """CPU us per inference by process ("loadgen": this one) and items per message by hop,
    over one closed loop."""
    await closed_loop(target, next_request, concurrency, 0.5, warmup_s=0)  # warm
    hops_before = hop_counts(mesh)
    before = {c.name: cpu_s(c.proc.pid) for c in mesh.children}
    mine = own_cpu_s()
    result = await closed_loop(target, next_request, concurrency, duration_s, warmup_s=0)
    n = max(1, result.ok + sum(result.errors.values()))
    cpu = {c.name: round((cpu_s(c.proc.pid) - before[c.name]) / n * 1e6, 1)
           for c in mesh.children}
    cpu["loadgen"] = round((own_cpu_s() - mine) / n * 1e6, 1)
    hops = {}
    for hop, after in hop_counts(mesh).items():
        b = hops_before.get(hop, HopCount())
        messages, items = after.messages - b.messages, after.items - b.items
        hops[hop] = {"messages": messages,
                     "items_per_message": round(items / messages, 2) if messages else None}
    summary = result.summary()
    return {"concurrency": concurrency, "throughput_rps": summary["throughput_rps"],
            "p50_ms": summary["p50_ms"], "errors": summary["errors"],
            "cpu_us_per_inference": cpu, "hops": hops}


def report(title: str, m: dict) -> str:
    lines = [f"{title}: {m['throughput_rps']} inferences/s at {m['concurrency']} clients; "
             "CPU us per inference:"]
    lines += [f"  {name:<10} {us:7.1f}" for name, us in m["cpu_us_per_inference"].items()]
    lines.append("  items per message:")
    lines += [f"  {hop:<24} {h['items_per_message']} ({h['messages']} messages)"
              for hop, h in sorted(m["hops"].items())]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        mesh = LocalMesh("models", ["cpu"], port=0, metrics_port=0, log_level="WARNING",
                         log_file=log)
        await mesh.start()
        try:
            target = Target(mesh.gateway_address)
            m = await measure(mesh, target, requests_for(args.inputs), args.concurrency,
                              args.duration_s)
            print(report(f"digits, {args.inputs} inputs", m))
            await target.close()
        finally:
            await mesh.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--inputs", choices=["distinct", "repeated", "uncached"], default="distinct")
    asyncio.run(main(p.parse_args()))
