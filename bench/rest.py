"""HTTP/JSON beside gRPC on the same gateway, in the same run (`make bench` calls compare()).

The same request (digits, one row, cache off, every output) as gRPC ModelInfer, as HTTP with
Triton's binary tensor data, and as HTTP with JSON tensors: p50 at concurrency 1, throughput
at 64, and the gateway process's CPU time per request for each (what aiohttp, the JSON and
the HTTP framing cost beside grpc). The HTTP load comes from an aiohttp client in this process.

    PYTHONPATH=. .venv/bin/python -m bench.rest [--duration-s 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import aiohttp
import numpy as np

from bench.cpu_per_request import cpu_s
from bench.loadgen import RunResult, Target, closed_loop, make_request

CONCURRENCY = (1, 64)


def bodies(rows: np.ndarray, binary: bool) -> list[tuple[bytes, dict]]:
    """(body, headers) of one inference per row."""
    out = []
    for row in rows:
        x = row[None].astype(np.float32)
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        params = {"cache": False}
        if binary:
            tensor["parameters"] = {"binary_data_size": x.nbytes}
            params["binary_data_output"] = True
        else:
            tensor["data"] = x.ravel().tolist()
        header = json.dumps({"inputs": [tensor], "parameters": params}).encode()
        if binary:
            out.append((header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                               "Content-Type": "application/octet-stream"}))
        else:
            out.append((header, {"Content-Type": "application/json"}))
    return out


async def http_closed_loop(url: str, requests: list[tuple[bytes, dict]], concurrency: int,
                           duration_s: float, warmup_s: float = 0.5) -> RunResult:
    """POSTs from `concurrency` callers (keep-alive connections) for duration_s."""
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    result = RunResult(duration_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def caller(k: int) -> None:
            i = k
            while (now := loop.time()) < stop_at:
                body, headers = requests[i % len(requests)]
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                if now >= measure_from:
                    if r.status == 200:
                        result.latencies_s.append(time.perf_counter() - t0)
                    else:
                        result.errors[str(r.status)] = result.errors.get(str(r.status), 0) + 1
                i += concurrency

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return result


async def compare(grpc_address: str, http_port: int, gateway_pid: int, duration_s: float) -> dict:
    rows = np.random.default_rng(2).integers(0, 17, size=(256, 64)).astype(np.float32)
    url = f"http://127.0.0.1:{http_port}/v2/models/digits/infer"
    target = Target(grpc_address)
    modes = {
        "grpc": None,
        "http_binary": bodies(rows, binary=True),
        "http_json": bodies(rows, binary=False),
    }
    out: dict = {}
    try:
        for c in CONCURRENCY:
            for mode, requests in modes.items():
                async def run(seconds: float, c=c, requests=requests) -> RunResult:
                    if requests is None:
                        return await closed_loop(target, lambda i: make_request(
                            "digits", rows[i % len(rows)][None], use_cache=False), c, seconds,
                            warmup_s=0)
                    return await http_closed_loop(url, requests, c, seconds, warmup_s=0)

                await run(0.5)  # warm: connections open, paths hot
                cpu0 = cpu_s(gateway_pid)
                result = await run(duration_s)
                summary = result.summary()
                summary["gateway_cpu_us_per_request"] = round(
                    (cpu_s(gateway_pid) - cpu0) / max(result.ok, 1) * 1e6, 1)
                out.setdefault(mode, {})[f"c{c}"] = summary
    finally:
        await target.close()
    for mode in ("http_binary", "http_json"):
        out[mode]["c1_p50_over_grpc"] = round(out[mode]["c1"]["p50_ms"] / out["grpc"]["c1"]["p50_ms"], 3)
        out[mode]["c64_throughput_over_grpc"] = round(
            out[mode]["c64"]["throughput_rps"] / out["grpc"]["c64"]["throughput_rps"], 3)
    return out


def report(results: dict) -> list[str]:
    lines = []
    for mode, r in results.items():
        lines.append(f"  {mode:<12} c=1 p50 {r['c1']['p50_ms']} ms, c=64 {r['c64']['throughput_rps']}/s"
                     f" (p99 {r['c64']['p99_ms']} ms); gateway CPU/request "
                     f"{r['c1']['gateway_cpu_us_per_request']} us (c=1), "
                     f"{r['c64']['gateway_cpu_us_per_request']} us (c=64)")
    return lines


async def beside(mesh, duration_s: float, log=print) -> dict:
    """`make bench`'s HTTP section, on its running LocalMesh (started with http_port=0)."""
    log("http: the same inference over HTTP (binary tensors, JSON tensors) beside gRPC")
    gateway = next(c for c in mesh.children if c.name.startswith("gateway"))
    results = await compare(mesh.gateway_address, mesh.http_port, gateway.proc.pid, duration_s)
    for line in report(results):
        log(line)
    return results


async def _main(duration_s: float) -> None:
    from meshserve.local_mesh import LocalMesh

    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        mesh = LocalMesh("models", ["cpu"], port=0, metrics_port=-1, log_level="WARNING",
                         log_file=log, http_port=0)
        await mesh.start()
        try:
            print(json.dumps(await beside(mesh, duration_s), indent=1))
        finally:
            await mesh.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.rest")
    p.add_argument("--duration-s", type=float, default=3.0)
    asyncio.run(_main(p.parse_args().duration_s))
