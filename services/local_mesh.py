"""`meshserve up`: the whole mesh on one machine, each service its own process.

Starts the cache, one model worker per visible GPU (else one CPU worker; --workers M for
M of them, spread over the GPUs), the batcher (--batchers N: N of them, every gateway
reaching all) and the gateway (--gateways N: N processes sharing the port with
SO_REUSEPORT); waits until each is healthy; loads the repository's models; prints the
address and a client command; prefixes every log line with its service's name; on Ctrl-C or
SIGTERM drains the gateways first, then the batcher, then workers and cache.
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
          "Redis for the cache, durable async tasks, routing policies and shared rate limits; "
          "empty: everything in memory", env="REDIS_URL")
    f.add("--log-level", str, "INFO", "log level of every service")
    # MESHSERVE_UP_*: MESHSERVE_WORKERS is the batcher's worker list.
    f.add("--gateways", int, 1, "gateway processes, sharing --port with SO_REUSEPORT",
          env="MESHSERVE_UP_GATEWAYS")
    f.add("--workers", int, 0, "model workers (0: one per GPU, else one on the CPU)",
          env="MESHSERVE_UP_WORKERS")
    f.add("--batchers", int, 1, "batcher processes; every gateway reaches all of them",
          env="MESHSERVE_UP_BATCHERS")
    f.add("--tls-dir", str, "", "mTLS between the services and TLS on the gateway, from "
          "DIR/ca.crt, DIR/tls.crt and DIR/tls.key (deploy/tls/make-dev-certs.sh DIR makes them)",
          env="MESHSERVE_UP_TLS_DIR")
    args = f.parse(argv)
    if args.gateways < 1 or args.batchers < 1 or args.workers < 0:
        f.parser.error("--gateways and --batchers must be >= 1 and --workers >= 0")
    if args.tls_dir:
        missing = [n for n in TLS_FILES if not (Path(args.tls_dir) / n).is_file()]
        if missing:
            f.parser.error(f"--tls-dir {args.tls_dir}: no {', '.join(missing)} there; make them "
                           f"with deploy/tls/make-dev-certs.sh {args.tls_dir}")
    return args


TLS_FILES = ("ca.crt", "tls.crt", "tls.key")


def tls_flags(tls_dir: str) -> tuple[str, ...]:
    """Every service's --tls-* flags for the certificates in tls_dir ("": plaintext)."""
    if not tls_dir:
        return ()
    d = Path(tls_dir).resolve()
    return ("--tls-ca", str(d / "ca.crt"), "--tls-cert", str(d / "tls.crt"),
            "--tls-key", str(d / "tls.key"))


def devices(spec: str, workers: int = 0) -> list[str]:
    """One device per worker: the devices of spec, or `workers` of them, round-robin."""
    if spec != "auto":
        found = [d.strip() for d in spec.split(",") if d.strip()]
    else:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        found = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    return [found[i % len(found)] for i in range(workers)] if workers else found


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, port_file: Path,
                 log_file=None):
        self.name, self.proc, self.port_file = name, proc, port_file
        self.out = log_file or sys.stdout
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        """Every line the service prints, prefixed with its name."""
        color = COLORS.get(self.name.split("-")[0], 0)
        tty = self.out.isatty()
        tag = f"\033[{color}m{self.name:>9}\033[0m |" if tty else f"{self.name:>9} |"
        async for line in self.proc.stdout:
            self.out.write(f"{tag} {line.decode(errors='replace')}")
            self.out.flush()

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


class LocalMesh:
    """Every service of the mesh as a child process of this one."""

    def __init__(self, model_repository: str, devices: list[str], redis_url: str = "",
                 host: str = "127.0.0.1", port: int = 8001, metrics_port: int = 8002,
                 log_level: str = "INFO", log_file=None, worker_flags: tuple[str, ...] = (),
                 batcher_flags: tuple[str, ...] = (), gateways: int = 1,
                 gateway_flags: tuple[str, ...] = (), tls_dir: str = "", batchers: int = 1):
        """devices: one model worker each; gateways: processes sharing `port` (SO_REUSEPORT).
        With several workers each loads every model at start (replicas, not one holder)."""
        if gateways < 1:
            raise ValueError(f"gateways must be >= 1, got {gateways}")
        self.gateways, self.batchers = gateways, batchers
        self.repo = str(Path(model_repository).resolve())
        self.devices, self.redis_url = devices, redis_url
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.log_level, self.log_file = log_level, log_file
        self.worker_flags, self.batcher_flags = worker_flags, batcher_flags
        self.gateway_flags = gateway_flags
        self.tls_dir = tls_dir  # mTLS inside, TLS on the gateway; "": plaintext
        self.tmp = Path(tempfile.mkdtemp(prefix="meshserve-up-"))
        self.children: list[Child] = []
        self.gateway_address = ""

    async def _start(self, name: str, module: str, *flags: str) -> Child:
        port_file = self.tmp / f"{name}.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *flags, "--port-file", str(port_file),
            "--log-level", self.log_level,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
        )
        child = Child(name, proc, port_file, self.log_file)
        self.children.append(child)
        return child

    async def start(self) -> None:
        internal = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                    *tls_flags(self.tls_dir))
        cache_flags = ("--redis-url", self.redis_url) if self.redis_url else ()
        cache = await self._start("cache", "meshserve.cache", *internal, *cache_flags)
        replicas = ("--load", "all") if len(self.devices) > 1 else ()
        workers = [
            await self._start(f"worker-{i}", "meshserve.model_worker", *internal,
                              "--device", device, "--model-repository", self.repo,
                              *replicas, *self.worker_flags)
            for i, device in enumerate(self.devices)
        ]
        cache_port = (await cache.ready())["grpc"]
        worker_ports = [(await w.ready())["grpc"] for w in workers]
        batchers = [await self._start(
            "batcher" if self.batchers == 1 else f"batcher-{i}", "meshserve.batcher",
            *internal, "--model-repository", self.repo,
            "--workers", ",".join(f"127.0.0.1:{p}" for p in worker_ports), "--load", "all",
            *cache_flags, *self.batcher_flags,  # Redis: the cluster's model control
        ) for i in range(self.batchers)]
        batcher_target = ",".join([f"127.0.0.1:{(await b.ready())['grpc']}" for b in batchers])
        port = self.port
        for i in range(self.gateways):
            # The first binds the port (it may be 0); the others join it with SO_REUSEPORT.
            metrics_port = self.metrics_port if i == 0 or self.metrics_port < 0 else 0
            gateway = await self._start(
                "gateway" if self.gateways == 1 else f"gateway-{i}", "meshserve.gateway",
                "--host", self.host, "--port", str(port), "--metrics-port", str(metrics_port),
                "--model-repository", self.repo, "--reuse-port", str(self.gateways > 1),
                "--batcher", batcher_target, "--cache", f"127.0.0.1:{cache_port}",
                *cache_flags, *tls_flags(self.tls_dir), *self.gateway_flags,
            )
            port = (await gateway.ready())["grpc"]
        self.gateway_address = f"127.0.0.1:{port}"
        await load_models(self.gateway_address, self.repo, self.tls_dir)

    def exited(self) -> list[asyncio.Task]:
        return [asyncio.ensure_future(c.proc.wait()) for c in self.children]

    async def stop(self) -> None:
        """Gateways first (they drain), then the batcher, then workers and cache."""
        def kind(child: Child) -> str:
            return child.name.split("-")[0]

        order = ["gateway", "batcher"]
        for name in order:
            await asyncio.gather(*(c.stop() for c in self.children if kind(c) == name))
        await asyncio.gather(*(c.stop() for c in self.children if kind(c) not in order))


async def run(args: argparse.Namespace) -> int:
    mesh = LocalMesh(args.model_repository, devices(args.devices, args.workers),
                     args.redis_url, args.host, args.port, args.metrics_port, args.log_level,
                     gateways=args.gateways, tls_dir=args.tls_dir, batchers=args.batchers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    up_task = asyncio.create_task(mesh.start())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait([up_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if up_task.done() and up_task.exception() is None:
        port = mesh.gateway_address.rsplit(":", 1)[1]
        gateways = f" ({args.gateways} gateways, {args.batchers} batchers)" \
            if args.gateways > 1 or args.batchers > 1 else ""
        say(f"meshserve is serving on {args.host}:{port}{gateways} "
            f"(metrics http://{args.host}:{args.metrics_port}/metrics)")
        tls = f" --tls-ca {Path(args.tls_dir) / 'ca.crt'}" if args.tls_dir else ""
        say("try:  .venv/bin/meshserve infer digits --input-file models/digits/example.json"
            + tls)
        say("stop: Ctrl-C")
        done, _ = await asyncio.wait([stop_task, *mesh.exited()],
                                     return_when=asyncio.FIRST_COMPLETED)
        if stop_task not in done:
            dead = [c.name for c in mesh.children if c.proc.returncode is not None]
            say(f"{', '.join(dead)} exited unexpectedly; stopping the mesh")
            code = 1
    elif up_task.done():
        say(f"start-up failed: {up_task.exception()}")
        code = 1
    else:
        up_task.cancel()
    say("stopping: gateway, batcher, then workers and cache")
    await mesh.stop()
    say("stopped")
    return code


async def load_models(target: str, repo: str, tls_dir: str = "") -> None:
    from meshserve.client import AsyncClient

    tls = {"tls_ca": str(Path(tls_dir) / "ca.crt")} if tls_dir else {}
    async with AsyncClient(target, **tls) as client:
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
