"""`make bench`: the mesh against its ceiling and against a plain server, in one run.

Every figure is measured beside its baseline in the same run and reported as a ratio too
(the machine is shared and noisy; absolute times drift). Loopback only, bounded in time.

    python -m bench [--duration-s 4] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import cpu_per_request
from bench import rest as http_bench
from bench.loadgen import Target, closed_loop, closed_loop_stream, make_request, open_loop
from bench.models import CNN_INPUT, build_repository
from meshserve.local_mesh import LocalMesh

ROOT = Path(__file__).resolve().parent.parent
SATURATION = [1, 4, 16, 64, 128]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------- in-process baselines


def in_process_latency(model_path: Path, x: np.ndarray, seconds: float) -> dict:
    """p50/p99 of one call of the model in this process, bytes in and out included."""
    torch.set_num_threads(1)
    model = torch.jit.load(str(model_path)).eval()
    raw = x.astype(np.float32).tobytes()
    latencies = []
    stop_at = time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            t = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(x.shape).copy())
            model(t).numpy().tobytes()
            latencies.append(time.perf_counter() - t0)
    lat = np.array(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(lat, 50)), 4),
            "p99_ms": round(float(np.percentile(lat, 99)), 4), "calls": len(lat)}


def in_process_ceiling(model_path: Path, row_shape: tuple[int, ...], batch: int,
                       seconds: float) -> dict:
    """Rows per second of the model called back to back at one batch size (one thread,
    as a worker runs it)."""
    torch.set_num_threads(1)
    model = torch.jit.load(str(model_path)).eval()
    x = torch.rand((batch, *row_shape))
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            calls += 1
        elapsed = time.perf_counter() - t0
    return {"batch_size": batch, "rows_per_s": round(calls * batch / elapsed, 1),
            "ms_per_batch": round(elapsed / calls * 1000, 3)}


# --------------------------------------------------------------------------- scenarios


def digits_rows(n: int = 512) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 17, size=(n, 64)).astype(np.float32)


async def mean_batch_size(target: Target, model: str, before=None):
    stats = await target.statistics(model)
    counts = {s.version: (s.inference_count - s.inference_stats.cache_hit.count,
                          s.execution_count) for s in stats.model_stats}
    rows = sum(c[0] for c in counts.values())
    execs = sum(c[1] for c in counts.values())
    if before is not None:
        rows, execs = rows - before[0], execs - before[1]
        return round(rows / execs, 2) if execs else None
    return rows, execs


async def measure(target: Target, model: str, next_request, concurrency: int,
                  duration_s: float, stream: bool = False) -> dict:
    before = await mean_batch_size(target, model) if model else None
    run = closed_loop_stream if stream else closed_loop
    result = await run(target, next_request, concurrency, duration_s)
    summary = result.summary()
    summary["concurrency"] = concurrency
    if model:
        summary["mean_batch_size"] = await mean_batch_size(target, model, before)
    return summary


HEADLINE_ROUNDS = 3


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _median_run(runs: list[dict]) -> dict:
    """One run's figures, each the median over the runs (throughput, p50, CPU per process,
    items per message)."""
    out = dict(runs[len(runs) // 2])
    for key in ("throughput_rps", "p50_ms", "cpu_us_per_request"):
        if key in out:
            out[key] = round(_median([r[key] for r in runs]), 1)
    if "cpu_us_per_inference" in out:
        out["cpu_us_per_inference"] = {
            name: round(_median([r["cpu_us_per_inference"][name] for r in runs]), 1)
            for name in out["cpu_us_per_inference"]}
    if "hops" in out:
        out["hops"] = {hop: {"messages": sum(r["hops"][hop]["messages"] for r in runs),
                             "items_per_message": _median(
                                 [r["hops"][hop]["items_per_message"] or 0 for r in runs])}
                       for hop in out["hops"]}
    return out


def distinct_requests(rows: np.ndarray):
    """A new input per request (cache on, every request a miss), as most real traffic."""
    offset = iter(range(1, 10**12))
    return lambda i: make_request(  # noqa: E731
        "digits", rows[i % len(rows)][None] + next(offset) * 1e-3, use_cache=True)


async def noop_cpu(target: Target, pid: int, next_request, concurrency: int,
                   duration_s: float) -> dict:
    """The do-nothing server at `concurrency`: throughput and its CPU us per request."""
    await closed_loop(target, next_request, concurrency, 0.5, warmup_s=0)
    before = cpu_per_request.cpu_s(pid)
    result = await closed_loop(target, next_request, concurrency, duration_s, warmup_s=0)
    summary = result.summary()
    summary["concurrency"] = concurrency
    summary["cpu_us_per_request"] = round(
        (cpu_per_request.cpu_s(pid) - before) / max(1, result.ok) * 1e6, 1)
    return summary


async def headline(mesh_children: LocalMesh, mesh: Target, noop: Target, noop_pid: int,
                   repo: Path, duration_s: float) -> dict:
    """The issue-14 targets, every figure beside the do-nothing v2 server of this run."""
    rows = digits_rows()
    distinct = distinct_requests(rows)
    hot = digits_rows(8) + 0.25
    repeated = lambda i: make_request("digits", hot[i % 8][None], use_cache=True)  # noqa: E731
    for i in range(8):  # warm: every repeated input cached
        await mesh.stubs[0].ModelInfer(repeated(i))
    out: dict = {"load_average_before": os.getloadavg()}

    log(f"headline: 64 clients, distinct inputs (misses), all hits, and the do-nothing server, "
        f"interleaved in {HEADLINE_ROUNDS} rounds (the medians: the machine is shared)")
    rounds = []
    for _ in range(HEADLINE_ROUNDS):
        base = await noop_cpu(noop, noop_pid, distinct, 64, duration_s / 2)
        miss = await cpu_per_request.measure(mesh_children, mesh, distinct, 64, duration_s / 2)
        hit = await cpu_per_request.measure(mesh_children, mesh, repeated, 64, duration_s / 2)
        rounds.append((base, miss, hit))
        log(f"  round: do-nothing {base['throughput_rps']}/s, misses {miss['throughput_rps']}/s, "
            f"hits {hit['throughput_rps']}/s")
    base64, miss64, hit64 = (_median_run([r[k] for r in rounds]) for k in range(3))
    cpu = miss64["cpu_us_per_inference"]
    worker_us = sum(v for k, v in cpu.items() if k.startswith("worker"))
    ratio = lambda runs: _median([m["throughput_rps"] / b["throughput_rps"]  # noqa: E731
                                  for (b, *_), m in zip(rounds, runs, strict=True)])
    out["c64"] = {
        "rounds": [{"noop": b, "mesh_misses": m, "mesh_hits": h} for b, m, h in rounds],
        "noop": base64, "mesh_misses": miss64, "mesh_hits": hit64,
        "misses_ratio_vs_noop": round(ratio([r[1] for r in rounds]), 3),
        "hits_ratio_vs_noop": round(ratio([r[2] for r in rounds]), 3),
        "gateway_cpu_ratio_vs_noop": round(cpu.get("gateway", 0) / base64["cpu_us_per_request"], 2),
        "cache_cpu_us": cpu.get("cache", 0),
        "batcher_plus_worker_cpu_us": round(cpu.get("batcher", 0) + worker_us, 1),
        "targets": {"misses_ratio_vs_noop": ">= 0.65", "hits_ratio_vs_noop": ">= 0.8",
                    "gateway_cpu_ratio_vs_noop": "<= 1.5", "cache_cpu_us": "<= 60",
                    "batcher_plus_worker_cpu_us": "<= 150"},
    }
    log(f"  medians: do-nothing {base64['throughput_rps']}/s ({base64['cpu_us_per_request']} us "
        f"CPU per request); mesh misses {miss64['throughput_rps']}/s "
        f"({out['c64']['misses_ratio_vs_noop']}x), all hits {hit64['throughput_rps']}/s "
        f"({out['c64']['hits_ratio_vs_noop']}x); gateway CPU "
        f"{out['c64']['gateway_cpu_ratio_vs_noop']}x the do-nothing server's")
    log("  " + cpu_per_request.report("misses", miss64).replace("\n", "\n  "))
    log("  " + cpu_per_request.report("all hits", hit64).replace("\n", "\n  "))

    log("headline: one client, against the model in-process")
    inproc = in_process_latency(repo / "digits" / "2" / "model.pt", rows[:1], duration_s)
    base1 = await measure(noop, "", distinct, 1, duration_s)
    miss1 = await measure(mesh, "", distinct, 1, duration_s)
    hit1 = await measure(mesh, "", repeated, 1, duration_s)
    out["c1"] = {
        "in_process": inproc, "noop": base1, "mesh_miss": miss1, "mesh_hit": hit1,
        "miss_added_p50_ms": round(miss1["p50_ms"] - inproc["p50_ms"], 3),
        "hit_added_p50_ms": round(hit1["p50_ms"] - inproc["p50_ms"], 3),
        "noop_added_p50_ms": round(base1["p50_ms"] - inproc["p50_ms"], 3),
        "targets": {"miss_added_p50_ms": "<= 1.5", "hit_added_p50_ms": "<= 0.8"},
    }
    log(f"  p50: in-process {inproc['p50_ms']} ms, do-nothing server {base1['p50_ms']} ms, "
        f"mesh miss {miss1['p50_ms']} ms (+{out['c1']['miss_added_p50_ms']}), hit "
        f"{hit1['p50_ms']} ms (+{out['c1']['hit_added_p50_ms']}) (hit ratio "
        f"{hit1['cache_hit_ratio']}, miss run {miss1['cache_hit_ratio']})")
    out["load_average_after"] = os.getloadavg()
    return out


async def scenarios(mesh_address: str, baseline_address: str, repo: Path,
                    duration_s: float) -> dict:
    rows = digits_rows()
    digits_v2 = repo / "digits" / "2" / "model.pt"
    mesh = Target(mesh_address)
    baseline = Target(baseline_address)
    distinct = distinct_requests(rows)  # misses: the cache on, a new input each time
    out: dict = {}

    log("saturation: concurrency 1..128, mesh vs unbatched server vs in-process ceiling")
    ceiling = in_process_ceiling(digits_v2, (64,), 64, duration_s / 2)
    sat = {"mesh": [], "mesh_stream": [], "unbatched_server": [],
           "in_process_ceiling": ceiling}
    for c in SATURATION:
        m = await measure(mesh, "digits", distinct, c, duration_s)
        ms = await measure(mesh, "digits", distinct, c, duration_s, stream=True)
        b = await measure(baseline, "", distinct, c, duration_s)
        sat["mesh"].append(m)
        sat["mesh_stream"].append(ms)
        sat["unbatched_server"].append(b)
        log(f"  c={c}: mesh {m['throughput_rps']}/s p99 {m['p99_ms']} ms (batch "
            f"{m['mean_batch_size']}), mesh stream {ms['throughput_rps']}/s (batch "
            f"{ms['mean_batch_size']}), unbatched {b['throughput_rps']}/s p99 {b['p99_ms']} ms")
    peak_mesh = max(r["throughput_rps"] for r in sat["mesh"])
    peak_stream = max(r["throughput_rps"] for r in sat["mesh_stream"])
    peak_base = max(r["throughput_rps"] for r in sat["unbatched_server"])
    sat["peak_ratio_vs_unbatched"] = round(peak_mesh / peak_base, 2)
    sat["peak_stream_ratio_vs_unbatched"] = round(peak_stream / peak_base, 2)
    sat["peak_ratio_vs_ceiling"] = round(peak_mesh / ceiling["rows_per_s"], 3)
    sat["target_ratio_vs_unbatched"] = 3.0
    out["saturation"] = sat

    log("compute-bound: cnn, against the in-process ceiling at the batch size chosen")
    images = np.random.default_rng(1).random((64, *CNN_INPUT), dtype=np.float32)
    cnn_req = lambda i: make_request("cnn", images[i % 64][None], use_cache=False)  # noqa: E731
    cnn = await measure(mesh, "cnn", cnn_req, 64, duration_s * 1.5)
    chosen = max(1, int(round(cnn["mean_batch_size"] or 1)))
    cnn_ceiling = in_process_ceiling(repo / "cnn" / "1" / "model.pt", CNN_INPUT, chosen,
                                     duration_s / 2)
    out["compute_bound"] = {
        "mesh": cnn, "in_process_ceiling": cnn_ceiling,
        "ratio_vs_ceiling": round(cnn["throughput_rps"] / cnn_ceiling["rows_per_s"], 3),
        "target_ratio": 0.9,
    }
    log(f"  mesh {cnn['throughput_rps']}/s at batch {cnn['mean_batch_size']}, ceiling "
        f"{cnn_ceiling['rows_per_s']}/s -> {out['compute_bound']['ratio_vs_ceiling']}")

    log("streaming: ModelStreamInfer against unary at the same concurrency")
    stream_rows = []
    for c in (16, 64):
        unary = await measure(mesh, "digits", distinct, c, duration_s)
        streamed = await measure(mesh, "digits", distinct, c, duration_s, stream=True)
        stream_rows.append({"concurrency": c, "unary": unary, "stream": streamed,
                            "stream_over_unary": round(
                                streamed["throughput_rps"] / unary["throughput_rps"], 2)})
        log(f"  c={c}: unary {unary['throughput_rps']}/s, stream {streamed['throughput_rps']}/s")
    out["streaming"] = stream_rows

    log("open loop: digits at a fixed rate of half the mesh's peak")
    rate = max(50.0, peak_mesh / 2)
    ol = (await open_loop(mesh, distinct, rate, duration_s)).summary()
    ol["rate_rps"] = rate
    out["open_loop"] = ol

    await mesh.close()
    await baseline.close()
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sat = results["saturation"]
    conc = [r["concurrency"] for r in sat["mesh"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(conc, [r["throughput_rps"] for r in sat["mesh"]], "o-", label="meshserve (ModelInfer)")
    a.plot(conc, [r["throughput_rps"] for r in sat["mesh_stream"]], "^-",
           label="meshserve (ModelStreamInfer)")
    a.plot(conc, [r["throughput_rps"] for r in sat["unbatched_server"]], "s-",
           label="unbatched gRPC server")
    ceiling = sat["in_process_ceiling"]
    a.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests/s",
          title=f"digits: throughput (in-process ceiling {ceiling['rows_per_s']:.0f} rows/s "
                f"at batch {ceiling['batch_size']})")
    a.legend(fontsize=8)
    b.plot(conc, [r["p99_ms"] for r in sat["mesh"]], "o-", label="meshserve (ModelInfer)")
    b.plot(conc, [r["p99_ms"] for r in sat["mesh_stream"]], "^-",
           label="meshserve (ModelStreamInfer)")
    b.plot(conc, [r["p99_ms"] for r in sat["unbatched_server"]], "s-",
           label="unbatched gRPC server")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)",
          title="digits: p99 latency")
    b.legend(fontsize=8)
    fig.suptitle(f"meshserve bench {results['started']} on {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-bench-"))
    repo = build_repository(tmp / "models")
    port = free_port()
    baseline_port, noop_port = free_port(), free_port()
    servers = [subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_server", "--model",
         str(repo / "digits" / "2" / "model.pt"), "--port", str(p), *flags],
        stdout=subprocess.PIPE, cwd=ROOT,
    ) for p, flags in ((baseline_port, ()), (noop_port, ("--noop",)))]
    for server in servers:
        server.stdout.readline()  # "ready"
    log_path = tmp / "mesh.log"
    with open(log_path, "w") as mesh_log:
        mesh = LocalMesh(str(repo), ["cpu"], os.environ.get("REDIS_URL", ""), port=port,
                         metrics_port=0, log_level="WARNING", log_file=mesh_log, http_port=0)
        log(f"starting the mesh (logs: {log_path})")
        try:
            await mesh.start()
            target, noop = Target(mesh.gateway_address), Target(f"127.0.0.1:{noop_port}")
            results = {"headline": await headline(mesh, target, noop, servers[1].pid, repo,
                                                  args.duration_s)}
            await target.close()
            await noop.close()
            if not args.headline_only:
                results.update(await scenarios(mesh.gateway_address,
                                               f"127.0.0.1:{baseline_port}", repo,
                                               args.duration_s))
                results["http"] = await http_bench.beside(mesh, args.duration_s, log)
        finally:
            await mesh.stop()
            for server in servers:
                server.terminate()
                server.wait()
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--duration-s", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--headline-only", action="store_true",
                   help="only the issue-14 targets (64 clients and one client)")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.monotonic()
    results = {
        "started": started,
        "command": "make bench",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    results.update(asyncio.run(run(args)))
    results["wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "")
    for name in (f"bench-{stamp}.json", "latest.json"):
        (out / name).write_text(json.dumps(results, indent=2) + "\n")
    if "saturation" in results:
        plot(results, out / "latest.png")
    log(f"wrote {out / 'latest.json'} and {out / 'latest.png'} in {results['wall_s']} s")


if __name__ == "__main__":
    main()
