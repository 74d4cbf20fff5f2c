"""`meshserve up`: the whole mesh on one machine, each service its own process.

Starts the cache, one model worker per visible GPU (else one CPU worker), the batcher and
the gateway; waits until each is healthy; loads the repository's models; prints the address
and a client command; prefixes every log line with its service's name; on Ctrl-C or SIGTERM
drains the gateway first, then the batcher, then workers and cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from meshserve.common.settings import Flags

COLORS = {"cache": 36, "worker": 33, "batcher": 35, "gateway": 32, "up": 1}


def parse(argv: list[str]) -> argparse.Namespace:
    f = Flags("meshserve up", "Run the whole mesh on this machine.")
    f.add("--host", str, "127.0.0.1", "address the gateway binds")
    f.add("--port", int, 8001, "gateway gRPC port")
    f.add("--metrics-port", int, 8002, "gateway Prometheus port")
    f.add("--model-repository", str, "models", "model repository folder")
    f.add("--devices", str, "auto", "'auto' (one worker per GPU, else CPU), 'cpu', or cuda:0,cuda:1")
    f.add("--redis-url", str, os.environ.get("REDIS_URL", ""),
          "Redis for the cache; empty: in-memory cache", env="REDIS_URL")
    f.add("--log-level", str, "INFO", "log level of every service")
    return f.parse(argv)


def devices(spec: str) -> list[str]:
    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, port_file: Path):
        self.name, self.proc, self.port_file = name, proc, port_file
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        color = COLORS.get(self.name.split("-")[0], 0)
        tag = f"\033[{color}m{self.name:>9}\033[0m |" if sys.stdout.isatty() else f"{self.name:>9} |"
        async for line in self.proc.stdout:
            sys.stdout.write(f"{tag} {line.decode(errors='replace')}")
            sys.stdout.flush()

    async def ready(self, timeout_s: float = 180) -> dict:
        """Waits for the port file a service writes once it is SERVING."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.port_file.exists():
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if loop.time() > deadline:
                raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f}s")
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.1)
            except TimeoutError:
                pass
        return json.loads(self.port_file.read_text())

    async def stop(self, timeout_s: float = 15) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.pump


def say(message: str) -> None:
    print(f"{'up':>9} | {message}", flush=True)


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-up-"))
    repo = str(Path(args.model_repository).resolve())
    children: list[Child] = []

    async def start(name: str, module: str, *flags: str) -> Child:
        port_file = tmp / f"{name}.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *flags, "--port-file", str(port_file),
            "--log-level", args.log_level,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        child = Child(name, proc, port_file)
        children.append(child)
        return child

    internal = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def bring_up() -> None:
        cache_flags = ("--redis-url", args.redis_url) if args.redis_url else ()
        cache = await start("cache", "meshserve.cache", *internal, *cache_flags)
        workers = [
            await start(f"worker-{i}", "meshserve.model_worker", *internal,
                        "--device", device, "--model-repository", repo)
            for i, device in enumerate(devices(args.devices))
        ]
        cache_port = (await cache.ready())["grpc"]
        worker_ports = [(await w.ready())["grpc"] for w in workers]
        batcher = await start(
            "batcher", "meshserve.batcher", *internal, "--model-repository", repo,
            "--workers", ",".join(f"127.0.0.1:{p}" for p in worker_ports), "--load", "all",
        )
        batcher_port = (await batcher.ready())["grpc"]
        gateway = await start(
            "gateway", "meshserve.gateway", "--host", args.host, "--port", str(args.port),
            "--metrics-port", str(args.metrics_port), "--model-repository", repo,
            "--batcher", f"127.0.0.1:{batcher_port}", "--cache", f"127.0.0.1:{cache_port}",
        )
        await gateway.ready()
        await load_models(f"127.0.0.1:{args.port}", repo)

    up_task = asyncio.create_task(bring_up())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait([up_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if up_task.done() and up_task.exception() is None:
        say(f"meshserve is serving on {args.host}:{args.port} "
            f"(metrics http://{args.host}:{args.metrics_port}/metrics)")
        say("try:  .venv/bin/meshserve infer digits --input-file models/digits/example.json")
        say("stop: Ctrl-C")
        died = [asyncio.create_task(c.proc.wait()) for c in children]
        done, _ = await asyncio.wait([stop_task, *died], return_when=asyncio.FIRST_COMPLETED)
        if stop_task not in done:
            dead = [c.name for c in children if c.proc.returncode is not None]
            say(f"{', '.join(dead)} exited unexpectedly; stopping the mesh")
            code = 1
    elif up_task.done():
        say(f"start-up failed: {up_task.exception()}")
        code = 1
    else:
        up_task.cancel()
    say("stopping: gateway, batcher, then workers and cache")
    order = ["gateway", "batcher"]
    for name in order:
        await asyncio.gather(*(c.stop() for c in children if c.name == name))
    await asyncio.gather(*(c.stop() for c in children if c.name not in order))
    say("stopped")
    return code


async def load_models(target: str, repo: str) -> None:
    from meshserve.client import AsyncClient

    async with AsyncClient(target) as client:
        for name in sorted(p.parent.name for p in Path(repo).glob("*/config.json")):
            try:
                await client.load_model(name)
                say(f"model '{name}' loaded")
            except Exception as e:  # noqa: BLE001 - one bad model must not stop the mesh
                say(f"model '{name}' failed to load: {e}")


def main(argv: list[str]) -> int:
    from meshserve.common import logs

    logs.setup("INFO")
    return asyncio.run(run(parse(argv)))
