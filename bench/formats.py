"""The model formats against TorchScript on this machine, in one run (`make bench` runs it).

For digits (version 2, from the shipped weights by models/digits/export.py) and the
bench's CNN (bench/models.py), in each format: load+warmup time (load_model in this
process, as the worker loads, with an empty compile cache), in-process latency per bucket
(the worker's runner, one thread: median CPU time of the call), and throughput through the mesh (closed loop,
ModelInfer, two rounds); each also as a ratio to the TorchScript model's figure in the same run.

    python -m bench.formats [--duration-s 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor  # noqa: F401 - imported up front: no variant's load time pays for it

ROOT = Path(__file__).resolve().parent.parent
DIGITS_VERSION = "2"
# (suffix, format, config changes): the model variants measured, TorchScript first.
VARIANTS = (
    ("ts", "torchscript", {}),
    ("export", "torch_export", {}),
    ("aoti", "aot_inductor", {}),
    ("mlp", "mlp_checkpoint", {}),
    ("compiled", "torch_export", {"compile": {"mode": "default", "dynamic": True}}),
    ("bf16", "torch_export", {"precision": "bf16"}),
)


def log(message: str) -> None:
    print(f"[bench.formats {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _export_tool():
    spec = importlib.util.spec_from_file_location("digits_export_tool",
                                                  ROOT / "models" / "digits" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(root: Path, name: str, config: dict, version: str, write) -> None:
    folder = root / name
    (folder / version).mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "name": name}, indent=2))
    write(folder / version)


def build_repository(root: Path) -> dict[str, list[tuple[str, str]]]:
    """digits_<suffix> and cnn_<suffix> for every variant (mlp: digits only) under root;
    returns {family: [(model name, variant suffix)]}."""
    from bench.models import CNN_CONFIG, CNN_INPUT, TinyResNet

    tool = _export_tool()
    digits_config = json.loads((ROOT / "models" / "digits" / "config.json").read_text())
    digits_config.pop("default_version", None)
    torch.manual_seed(0)
    cnn = TinyResNet().eval()
    batch = torch.export.Dim("batch", min=1, max=CNN_CONFIG["max_batch_size"])
    with torch.no_grad():
        cnn_program = torch.export.export(cnn, (torch.zeros(2, *CNN_INPUT),),
                                          dynamic_shapes=({0: batch},))
    files = {"torchscript": "model.pt", "torch_export": "model.pt2", "aot_inductor": "model.pt2",
             "mlp_checkpoint": "model.pth"}

    def write_cnn(fmt: str, folder: Path) -> None:
        path = folder / files[fmt]
        if fmt == "torchscript":
            torch.jit.save(torch.jit.script(cnn), str(path))
        elif fmt == "torch_export":
            torch.export.save(cnn_program, str(path))
        else:
            from torch._inductor import aoti_compile_and_package

            aoti_compile_and_package(cnn_program, package_path=str(path))

    families: dict[str, list[tuple[str, str]]] = {"digits": [], "cnn": []}
    for suffix, fmt, changes in VARIANTS:
        log(f"writing digits_{suffix} ({fmt} {changes or ''})")
        _model(root, f"digits_{suffix}", {**digits_config, "format": fmt, **changes},
               DIGITS_VERSION, lambda folder, fmt=fmt: shutil.copyfile(
                   tool.write(fmt, DIGITS_VERSION, root / "_tool"), folder / files[fmt]))
        families["digits"].append((f"digits_{suffix}", suffix))
        if fmt == "mlp_checkpoint":
            continue
        log(f"writing cnn_{suffix}")
        _model(root, f"cnn_{suffix}", {**CNN_CONFIG, "format": fmt, **changes}, "1",
               lambda folder, fmt=fmt: write_cnn(fmt, folder))
        families["cnn"].append((f"cnn_{suffix}", suffix))
    shutil.rmtree(root / "_tool")
    return families


def inputs_for(family: str, rows: int) -> np.ndarray:
    from bench.models import CNN_INPUT

    rng = np.random.default_rng(rows)
    if family == "digits":
        return rng.integers(0, 17, size=(rows, 64)).astype(np.float32)
    return rng.random((rows, *CNN_INPUT), dtype=np.float32)


def in_process(root: Path, name: str, family: str, version: str, budget_s: float) -> dict:
    """Load+warmup seconds and the median latency of every bucket, in this process."""
    from meshserve.common.repository import ModelRepository
    from meshserve.model_worker.models import load_model

    repo = ModelRepository(root)
    config = repo.config(name)
    t0 = time.perf_counter()
    model = load_model(config, repo.model_file(name, version), version, "cpu", False)
    load_s = time.perf_counter() - t0
    latency, latency_wall = {}, {}
    for bucket in config.buckets():
        x = torch.from_numpy(inputs_for(family, bucket))
        for _ in range(2):
            model.runner.run([x])
        wall, cpu, stop = [], [], time.perf_counter() + budget_s
        while len(wall) < 5 or (time.perf_counter() < stop and len(wall) < 500):
            t, c = time.perf_counter(), time.thread_time()
            model.runner.run([x])
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        # One intra-op thread: the call computes on this thread, and its CPU time is what
        # the call costs whatever else the shared machine runs (the wall time is also kept).
        latency[bucket] = round(statistics.median(cpu) * 1e6, 1)
        latency_wall[bucket] = round(statistics.median(wall) * 1e6, 1)
    return {"load_warmup_s": round(load_s, 3), "compile_s": round(model.compile_ns / 1e9, 3),
            "compiled": model.compiled, "latency_us": latency, "latency_wall_us": latency_wall}


async def through_mesh(root: Path, families: dict, duration_s: float) -> dict[str, dict]:
    from bench.loadgen import Target, closed_loop, make_request
    from meshserve.local_mesh import LocalMesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out: dict[str, dict] = {}
    with open(root.parent / "mesh.log", "w") as mesh_log:
        # Every variant stays loaded (the default --max-models 8 would evict some, and a
        # compiled one would then compile again on its first request).
        mesh = LocalMesh(str(root), ["cpu"], "", port=port, metrics_port=-1,
                         log_level="INFO", log_file=mesh_log,
                         worker_flags=("--max-models", str(2 * len(VARIANTS))))
        log(f"starting the mesh (logs: {root.parent / 'mesh.log'}); it loads every variant")
        try:
            await mesh.start()
            target = Target(mesh.gateway_address)
            # Two rounds over every model (the mesh warms up during the first points):
            # each model's figure is the mean of its two.
            for round_ in (1, 2):
                for family, models in families.items():
                    rows = inputs_for(family, 64)
                    clients = 64 if family == "digits" else 32
                    for name, _suffix in models:
                        def request(i, name=name, rows=rows):
                            return make_request(name, rows[i % len(rows)][None],
                                                use_cache=False)

                        s = (await closed_loop(target, request, clients, duration_s)).summary()
                        row = out.setdefault(name, {"clients": clients, "rounds": [],
                                                    "errors": {}})
                        row["rounds"].append(s["throughput_rps"])
                        for code, n in s["errors"].items():
                            row["errors"][code] = row["errors"].get(code, 0) + n
                        row["throughput_rps"] = round(statistics.mean(row["rounds"]), 1)
                        log(f"  round {round_}: {name}: {s['throughput_rps']} req/s at "
                            f"{clients} clients, p50 {s['p50_ms']} ms")
            await target.close()
        finally:
            await mesh.stop()
    return out


def ratio(value, base) -> float | None:
    return round(value / base, 2) if value and base else None


def table(results: dict) -> str:
    lines = ["| model | format | load+warmup s (x TS) | CPU us per call by bucket (x TS) | "
             "mesh req/s (x TS) |", "|---|---|---|---|---|"]
    for family, rows in results["families"].items():
        base = rows[0]
        for row in rows:
            shown = [b for b in row["latency_us"] if b in results["shown_buckets"][family]]
            lat = ", ".join(
                f"b{b}: {row['latency_us'][b]} ({ratio(row['latency_us'][b], base['latency_us'][b])})"
                for b in shown)
            mesh = row.get("mesh", {}).get("throughput_rps")
            lines.append(
                f"| {row['model']} | {row['format']}{' ' + row['changes'] if row['changes'] else ''}"
                f" | {row['load_warmup_s']} ({ratio(row['load_warmup_s'], base['load_warmup_s'])})"
                f" | {lat} | {mesh} ({ratio(mesh, base.get('mesh', {}).get('throughput_rps'))}) |")
    return "\n".join(lines)


def run(duration_s: float, out: Path) -> dict:
    torch.set_num_threads(1)  # as the worker runs a batch (--threads 1)
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-bench-formats-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-cache")  # a cold cache
    root = tmp / "models"
    t0 = time.monotonic()
    families = build_repository(root)
    log(f"repository built in {time.monotonic() - t0:.0f} s")

    changes = {s: json.dumps(c, separators=(",", ":")) if c else "" for s, _f, c in VARIANTS}
    formats = {s: f for s, f, _c in VARIANTS}
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "python -m bench.formats",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_at_start": os.getloadavg()},
        "families": {}, "shown_buckets": {"digits": [1, 16, 64], "cnn": [1, 8, 32]},
    }
    for family, models in families.items():
        version = DIGITS_VERSION if family == "digits" else "1"
        rows = []
        for name, suffix in models:
            log(f"in-process: {name}")
            row = {"model": name, "format": formats[suffix], "changes": changes[suffix],
                   **in_process(root, name, family, version, duration_s / 10)}
            rows.append(row)
            log(f"  load+warmup {row['load_warmup_s']} s, latency {row['latency_us']}")
        results["families"][family] = rows
    mesh = asyncio.run(through_mesh(root, families, duration_s))
    for rows in results["families"].values():
        for row in rows:
            row["mesh"] = mesh.get(row["model"], {})
    results["loadavg_at_end"] = os.getloadavg()
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["table"] = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "formats-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "formats-latest.md").write_text(results["table"] + "\n")
    failed = [r["model"] for rows in results["families"].values() for r in rows
              if not r["mesh"].get("throughput_rps") or r["mesh"].get("errors")]
    if failed:  # keep the repository and the mesh's log to look into
        log(f"no or failed answers through the mesh from {failed}: see {tmp / 'mesh.log'}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.formats")
    p.add_argument("--duration-s", type=float, default=3.0, help="seconds per mesh point")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    results = run(args.duration_s, Path(args.out))
    print(results["table"])
    log(f"wrote {Path(args.out) / 'formats-latest.json'} in {results['wall_s']} s")


if __name__ == "__main__":
    main()
