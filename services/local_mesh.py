"""`meshserve up`: the whole mesh on one machine, each service its own supervised process.

Starts the cache, one model worker per visible GPU (else one CPU worker; --workers M for
M of them, spread over the GPUs), the batcher (--batchers K: K of them, every gateway
reaching all) and the gateway (--gateways N: N processes sharing the port with
SO_REUSEPORT); waits until each is healthy; loads the repository's
models; prints the address, every service's metrics address and a client command;
prefixes every log line with its service's name.

Supervision. A service that exits unexpectedly (a signal, a nonzero exit code) is started
again on the same ports, so every peer's address stays valid (the batcher reconnects to a
restarted worker, which loads its models again at start), after a backoff doubling from
RESTART_FIRST_S to RESTART_MAX_S. Each restart is logged and counted
(`meshserve_up_restarts_total{service}` on --up-metrics-port). After `restart_limit` quick
crashes in a row (each within QUICK_CRASH_S of its start) `up` gives up on the service;
when that leaves none of its kind (the batcher, the cache, the last worker or gateway) the
mesh stops with one line naming the cause. A service that exits 0 stopped on purpose
(someone drained it) and is not restarted.

`up` checks its own ports before starting anything; children die with it, even when it is
SIGKILLed (each asks for PR_SET_PDEATHSIG at start: logs.die_with_parent); Ctrl-C, SIGTERM
and SIGHUP drain the gateways first, then the batcher, then workers and cache, and remove
the temporary folder. A child's output is read in chunks: any bytes, lines of any length
(cut at MAX_LINE_BYTES with a marker), a reader that never stops, so a child never blocks
on a full pipe; a thread writes it out (`Output`), so a terminal that does not read cannot
stop the reader either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import queue
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from meshserve.common import logs
from meshserve.common.backoff import Backoff
from meshserve.common.settings import Flags, parse_bool

COLORS = {"cache": 36, "worker": 33, "batcher": 35, "gateway": 32, "up": 1}

RESTART_FIRST_S, RESTART_MAX_S = 0.5, 10.0
QUICK_CRASH_S = 30.0  # a crash this soon after a start counts towards giving up
RESTART_LIMIT = 5  # quick crashes in a row before giving up on a service
READY_TIMEOUT_S = 180.0
MAX_LINE_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Kind:
    """One kind of service: its module and when it stops (0 first: gateways drain before
    the batcher they send to, which drains before the workers)."""

    module: str
    stop_order: int


KINDS = {
    "gateway": Kind("meshserve.gateway", 0),
    "batcher": Kind("meshserve.batcher", 1),
    "worker": Kind("meshserve.model_worker", 2),
    "cache": Kind("meshserve.cache", 2),
}


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service. port / metrics_port 0: any free port (once bound, kept
    across restarts); metrics_port -1: no metrics."""

    name: str  # worker-0, gateway, ...
    kind: str  # a key of KINDS
    flags: tuple[str, ...] = ()  # every flag but the ports
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0

    def bound(self, ports: dict) -> ServiceSpec:
        """This spec with the ports the service bound (its port file: {"grpc": ..,
        "metrics": .., "http": ..}) in place of any-free-port ones, so that a restart binds
        them again: its peers' addresses stay valid."""
        flags = list(self.flags)
        for name, port in ports.items():
            flag = f"--{name}-port"
            if name not in ("grpc", "metrics") and port and flag in flags[:-1]:
                i = flags.index(flag) + 1
                if flags[i] == "0":
                    flags[i] = str(port)
        metrics = ports.get("metrics")
        return replace(self, port=ports["grpc"], flags=tuple(flags),
                       metrics_port=self.metrics_port if metrics is None else metrics)

    def argv(self, port_file: Path, log_level: str) -> list[str]:
        return [sys.executable, "-m", KINDS[self.kind].module, "--host", self.host,
                "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                *self.flags, "--port-file", str(port_file), "--log-level", log_level]


def parse(argv: list[str]) -> argparse.Namespace:
    f = Flags("meshserve up", "Run the whole mesh on this machine.")
    f.add("--host", str, "127.0.0.1", "address the gateway binds")
    f.add("--port", int, 8001, "gateway gRPC port")
    f.add("--http-port", int, 8000, "gateway HTTP/JSON port (-1: off)")
    f.add("--metrics-port", int, 8002, "gateway Prometheus port (-1: none)")
    f.add("--model-repository", str, "models", "model repository folder")
    f.add("--devices", str, "auto", "'auto' (one worker per GPU, else CPU), 'cpu', or cuda:0,cuda:1")
    f.add("--redis-url", str, os.environ.get("REDIS_URL", ""),
          "Redis for the cache, durable async tasks, routing policies, shared rate limits and "
          "the model control of every batcher and gateway; "
          "empty: everything in memory", env="REDIS_URL")
    f.add("--log-level", str, "INFO", "log level of every service")
    # MESHSERVE_UP_*: MESHSERVE_WORKERS is the batcher's worker list.
    f.add("--gateways", int, 1, "gateway processes, sharing --port with SO_REUSEPORT",
          env="MESHSERVE_UP_GATEWAYS")
    f.add("--batchers", int, 1, "batcher processes; every gateway reaches all of them",
          env="MESHSERVE_UP_BATCHERS")
    f.add("--workers", int, 0, "model workers (0: one per GPU, else one on the CPU)",
          env="MESHSERVE_UP_WORKERS")
    f.add("--tls-dir", str, "", "mTLS between the services and TLS on the gateway, from "
          "DIR/ca.crt, DIR/tls.crt and DIR/tls.key (deploy/tls/make-dev-certs.sh DIR makes them)",
          env="MESHSERVE_UP_TLS_DIR")
    f.add("--up-metrics-port", int, None, "Prometheus port of `up` itself: restarts and "
          "state of every service (-1: none; default: --metrics-port + 1, i.e. 8003, none "
          "when --metrics-port is -1, any free port when it is 0)",
          env="MESHSERVE_UP_METRICS_PORT")
    f.add("--api-keys-file", str, "", "API keys of the gateways (`meshserve keys add`); up's "
          "own calls then use the admin key in MESHSERVE_API_KEY", env="MESHSERVE_UP_API_KEYS_FILE")
    f.parser.add_argument(
        "--insecure", action="store_true",
        default=parse_bool(f.env.get("MESHSERVE_UP_INSECURE", "false")),
        help="let the gateways serve a non-loopback --host without API keys: anyone reaching "
             "it may infer, load, unload and reroute [env MESHSERVE_UP_INSECURE]")
    f.add("--restart-limit", int, RESTART_LIMIT, "quick crashes in a row (each within "
          f"{QUICK_CRASH_S:.0f}s of its start) before giving up on a service",
          env="MESHSERVE_UP_RESTART_LIMIT")
    args = f.parse(argv)
    if args.up_metrics_port is None:
        args.up_metrics_port = args.metrics_port + 1 if args.metrics_port > 0 else args.metrics_port
    if args.gateways < 1 or args.batchers < 1 or args.workers < 0 or args.restart_limit < 0:
        f.parser.error("--gateways and --batchers must be >= 1, --workers and "
                       "--restart-limit >= 0")
    if args.api_keys_file and not Path(args.api_keys_file).is_file():
        f.parser.error(f"--api-keys-file {args.api_keys_file}: no such file (make one with "
                       "`meshserve keys add`)")
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


def taken_port(checks: list[tuple[str, int, str]]) -> str | None:
    """The first (host, port, what) that cannot be bound, as one line; None when all can.
    Port 0 or -1 (any port, none) is never taken."""
    for host, port, what in checks:
        if port <= 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as e:
            return f"cannot use {host}:{port} ({what}): {e}"
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as s:
                # As the services bind: past connections in TIME_WAIT do not count.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(address)
                except OSError as e:
                    why = ("is in use (another `meshserve up`?)" if e.errno == errno.EADDRINUSE
                           else f"cannot be bound: {e.strerror}")
                    return f"port {port} on {host} ({what}) {why}; nothing was started"
    return None


class Lines:
    """Splits a byte stream into text lines: any bytes (invalid UTF-8 replaced), any line
    length (a line over max_bytes is cut, with a marker naming its length)."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES):
        self.max_bytes = max_bytes
        self._head = bytearray()  # the current line, up to max_bytes of it
        self._length = 0  # its whole length

    def feed(self, chunk: bytes) -> list[str]:
        out = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end < 0 else end
            room = self.max_bytes - len(self._head)
            if room > 0:
                self._head += chunk[start:min(stop, start + room)]
            self._length += stop - start
            if end < 0:
                return out
            out.append(self._take())
            start = end + 1

    def flush(self) -> list[str]:
        """The last line, when the stream ended without a newline."""
        return [self._take()] if self._length else []

    def _take(self) -> str:
        text = self._head.decode(errors="replace").rstrip("\r")
        if self._length > len(self._head):
            text += f" ...[line of {self._length} bytes cut]"
        self._head.clear()
        self._length = 0
        return text


def write(out, text: str) -> None:
    """Text to a stream; a closed or broken terminal (SIGHUP) loses it, nothing else."""
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        pass


class Output:
    """Where `up` writes its services' lines and its own: a thread does the blocking writes,
    so a terminal that does not read (Ctrl-S, a paused pager) never stops `up` from reading
    its services' pipes (a service blocks when its pipe is full). Past MAX_PENDING pieces
    waiting, new ones are dropped, and the next written says how many."""

    MAX_PENDING = 1024  # pieces (a piece: the lines of one read, at most ~64 KiB)

    def __init__(self, stream, max_pending: int = MAX_PENDING):
        self.stream = stream
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        threading.Thread(target=self._run, name="up-output", daemon=True).start()

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, text: str) -> None:
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits (at most timeout_s) until everything queued so far is written."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            dropped, self.dropped = self.dropped, 0  # a lost count or two is no harm
            if dropped:
                item = f"{'up':>9} | [{dropped} pieces of output dropped: not read]\n" + item
            write(self.stream, item)


def say(message: str, out=None) -> None:
    """One line of `up`'s own, to an Output or a stream (default: stdout)."""
    text = f"{'up':>9} | {message}\n"
    if isinstance(out, Output):
        out.write(text)
    else:
        write(out or sys.stdout, text)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ ")
_CRITICAL = re.compile(r"^.*? CRITICAL [\w.]+: ")


def stop_cause(lines: list[str]) -> str:
    """See Service.cause."""
    for line in reversed(lines):
        if " CRITICAL " in line:
            return _CRITICAL.sub("", line.strip())
    cause, in_traceback, ignored = "", False, False
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
            ignored = i > 0 and lines[i - 1].startswith("Exception ignored")
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if not ignored:
                cause = line.strip()
    if cause:
        return cause
    for line in reversed(lines):
        if line.strip():
            return _LOG_PREFIX.sub("", line.strip())
    return "no output"


class Service:
    """One supervised service: its current process, its output pump, its restarts."""

    def __init__(self, spec: ServiceSpec, folder: Path, log_level: str, out=None):
        self.spec, self.log_level = spec, log_level
        self.port_file = folder / f"{spec.name}.json"
        self.out = out if isinstance(out, Output) else Output(out or sys.stdout)
        self.proc: asyncio.subprocess.Process | None = None
        self.pump: asyncio.Task | None = None
        self.ports: dict = {}
        self.tail: deque[str] = deque(maxlen=200)  # its last lines, for a failure's cause
        self.started_at = 0.0
        self.restarts = 0  # since `up` started
        self.quick_crashes = 0  # in a row
        self.gave_up = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def launch(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv(self.port_file, self.log_level),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
            # The child asks for SIGKILL when `up` dies (logs.die_with_parent), not a
            # preexec_fn here: Python code between fork and exec runs gRPC's fork handlers
            # in a child of a process that uses gRPC, which aborted a worker at start.
            env={**os.environ, logs.PARENT_ENV: str(os.getpid())},
        )
        self.started_at = asyncio.get_running_loop().time()
        self.pump = asyncio.create_task(self._pump(self.proc.stdout))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        """Every line the service prints, prefixed with its name, until its output ends."""
        color = COLORS.get(self.kind, 0)
        tty = self.out.isatty()
        tag = f"\033[{color}m{self.name:>9}\033[0m |" if tty else f"{self.name:>9} |"
        lines = Lines()
        while chunk := await stream.read(READ_CHUNK):
            self._show(tag, lines.feed(chunk))
        self._show(tag, lines.flush())

    def _show(self, tag: str, lines: list[str]) -> None:
        if lines:
            self.tail.extend(lines)
            self.out.write("".join(f"{tag} {line}\n" for line in lines))

    def cause(self) -> str:
        """Why the service stopped, from its last lines: its one-line failure (logs.run),
        else the last line of its last traceback (not of the noise Python prints while it
        exits: "Exception ignored in ..."), else its last line; without the timestamp."""
        return stop_cause(list(self.tail))

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict:
        """Waits for the port file a service writes once it is SERVING; then its ports
        are kept for restarts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.port_file.exists():
            if self.proc.returncode is not None:
                await self.pump  # its last lines name the cause
                code = self.proc.returncode
                why = f": {self.cause()}" if code > 0 else ""
                raise RuntimeError(f"{self.name} exited ({describe_exit(code)}){why}")
            if loop.time() > deadline:
                raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.1)
        self.ports = json.loads(self.port_file.read_text())
        self.spec = self.spec.bound(self.ports)
        return self.ports

    async def stop(self, timeout_s: float = 15) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.pump


Child = Service  # the name benches and tests used


class UpMetrics:
    """`up`'s own Prometheus metrics: restarts and state of every service."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.restarts = Counter("meshserve_up_restarts", "Restarts of a service by `up`",
                                ["service"], registry=self.registry)
        self.running = Gauge("meshserve_up_service_running",
                             "1 while the service's process runs", ["service"],
                             registry=self.registry)
        self.gave_up = Gauge("meshserve_up_service_gave_up",
                             "1 once `up` gave up restarting the service", ["service"],
                             registry=self.registry)


class LocalMesh:
    """Every service of the mesh as a supervised child process of this one."""

    def __init__(self, model_repository: str, devices: list[str], redis_url: str = "",
                 host: str = "127.0.0.1", port: int = 8001, metrics_port: int = 8002,
                 log_level: str = "INFO", log_file=None, worker_flags: tuple[str, ...] = (),
                 batcher_flags: tuple[str, ...] = (), gateways: int = 1,
                 gateway_flags: tuple[str, ...] = (), tls_dir: str = "",
                 restart_limit: int = RESTART_LIMIT, restart_first_s: float = RESTART_FIRST_S,
                 http_port: int = -1, batchers: int = 1):
        """devices: one model worker each; gateways: processes sharing `port`
        (SO_REUSEPORT); batchers: each gateway reaches every one."""
        if gateways < 1:
            raise ValueError(f"gateways must be >= 1, got {gateways}")
        self.gateways, self.batchers = gateways, batchers
        self.repo = str(Path(model_repository).resolve())
        self.devices, self.redis_url = devices, redis_url
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.http_port = http_port  # the gateways' HTTP/JSON port (-1: off); the bound one once up
        self.log_level, self.log_file = log_level, log_file
        self.out = Output(log_file or sys.stdout)  # every service's lines and ours
        self.worker_flags, self.batcher_flags = worker_flags, batcher_flags
        self.gateway_flags = gateway_flags
        self.tls_dir = tls_dir  # mTLS inside, TLS on the gateway; "": plaintext
        self.restart_limit, self.restart_first_s = restart_limit, restart_first_s
        self.tmp = Path(tempfile.mkdtemp(prefix="meshserve-up-"))
        self.children: list[Service] = []
        self.gateway_address = ""
        self.metrics = UpMetrics()
        self.stopping = False
        # Set (with the reason) when the mesh cannot serve on: `up` stops it.
        self.fatal: asyncio.Future[str] | None = None
        self._supervisors: list[asyncio.Task] = []

    def say(self, message: str) -> None:
        say(message, self.out)

    async def _start(self, spec: ServiceSpec) -> Service:
        service = Service(spec, self.tmp, self.log_level, self.out)
        self.children.append(service)
        await service.launch()
        self.metrics.running.labels(spec.name).set(1)
        return service

    async def start(self) -> None:
        self.fatal = asyncio.get_running_loop().create_future()
        internal = tls_flags(self.tls_dir)
        cache_flags = ("--redis-url", self.redis_url) if self.redis_url else ()
        cache = await self._start(ServiceSpec("cache", "cache", (*internal, *cache_flags)))
        # Several workers each load every model at start (replicas; a restarted one comes
        # back with them); one alone gets them from the batcher's --load (again on demand
        # after a restart).
        replicas = ("--load", "all") if len(self.devices) > 1 else ()
        workers = [
            await self._start(ServiceSpec(
                f"worker-{i}", "worker",
                (*internal, "--device", device, "--model-repository", self.repo,
                 *replicas, *self.worker_flags)))
            for i, device in enumerate(self.devices)
        ]
        cache_port = (await cache.ready())["grpc"]
        worker_ports = [(await w.ready())["grpc"] for w in workers]
        batchers = [await self._start(ServiceSpec(
            "batcher" if self.batchers == 1 else f"batcher-{i}", "batcher", (
                *internal, "--model-repository", self.repo,
                "--workers", ",".join(f"127.0.0.1:{p}" for p in worker_ports), "--load", "all",
                *cache_flags, *self.batcher_flags)))  # Redis: the cluster's model control
            for i in range(self.batchers)]
        batcher_target = ",".join([f"127.0.0.1:{(await b.ready())['grpc']}" for b in batchers])
        port, http_port = self.port, self.http_port
        for i in range(self.gateways):
            # The first binds the port (it may be 0); the others join it with SO_REUSEPORT.
            metrics_port = self.metrics_port if i == 0 or self.metrics_port < 0 else 0
            gateway = await self._start(ServiceSpec(
                "gateway" if self.gateways == 1 else f"gateway-{i}", "gateway",
                ("--model-repository", self.repo, "--reuse-port", str(self.gateways > 1),
                 "--batcher", batcher_target, "--cache", f"127.0.0.1:{cache_port}",
                 *cache_flags, *internal, "--http-port", str(http_port), *self.gateway_flags),
                host=self.host, port=port, metrics_port=metrics_port))
            ports = await gateway.ready()
            port, http_port = ports["grpc"], ports.get("http", -1)
        self.http_port = http_port
        self.gateway_address = f"127.0.0.1:{port}"
        await load_models(self.gateway_address, self.repo, self.tls_dir, self.out)
        self._supervisors = [asyncio.create_task(self._supervise(s)) for s in self.children]

    def metrics_addresses(self) -> list[tuple[str, str]]:
        """(service, http://host:port/metrics) of every service serving metrics."""
        return [(s.name, f"http://{s.spec.host}:{s.ports['metrics']}/metrics")
                for s in self.children if s.ports.get("metrics")]

    async def _supervise(self, service: Service) -> None:
        """Restarts the service whenever it exits unexpectedly, until `up` gives up on it."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.restart_first_s, RESTART_MAX_S)  # doubles per quick crash
        while True:
            code = await service.proc.wait()
            await service.pump
            self.metrics.running.labels(service.name).set(0)
            if self.stopping:
                return
            if code == 0:
                self._lost(service, f"{service.name} stopped (exit code 0); not restarting it")
                return
            lived_s = loop.time() - service.started_at
            service.quick_crashes = service.quick_crashes + 1 if lived_s < QUICK_CRASH_S else 1
            if service.quick_crashes == 1:
                backoff.reset()
            why = describe_exit(code) + (f": {service.cause()}" if code > 0 else "")
            if service.quick_crashes > self.restart_limit:
                service.gave_up = True
                self.metrics.gave_up.labels(service.name).set(1)
                n = service.quick_crashes
                self._lost(service, f"{service.name} crashed {n} times in a row ({n - 1} "
                           f"restarts, each ending within {QUICK_CRASH_S:.0f}s); giving up on "
                           f"it (last: {why})")
                return
            self.say(f"{service.name} exited unexpectedly ({why}); restarting it in "
                     f"{backoff.delay_s:.1f}s (restart {service.restarts + 1})")
            await backoff.wait()
            if self.stopping:
                return
            service.restarts += 1
            self.metrics.restarts.labels(service.name).inc()
            await service.launch()
            self.metrics.running.labels(service.name).set(1)
            try:
                await service.ready()
            except RuntimeError as e:
                if service.running:  # hung at start: counts as a crash
                    self.say(f"{e}; killing it")
                    service.proc.kill()
                continue
            self.say(f"{service.name} is back on port {service.spec.port}")

    def _lost(self, service: Service, message: str) -> None:
        """A service that will not come back: the mesh serves on while another of its kind
        runs, else it stops."""
        others = [s for s in self.children
                  if s.kind == service.kind and s is not service and not s.gave_up
                  and s.running]
        if others:
            self.say(f"{message}; serving on with {len(others)} other {service.kind}(s)")
        elif not self.fatal.done():
            self.fatal.set_result(f"{message}; no {service.kind} left")

    async def stop(self) -> None:
        """Gateways first (they drain), then the batcher, then workers and cache; then
        the temporary folder goes."""
        self.stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for order in sorted({KINDS[s.kind].stop_order for s in self.children}):
            await asyncio.gather(*(s.stop() for s in self.children
                                   if KINDS[s.kind].stop_order == order))
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.out.flush()


async def run(args: argparse.Namespace) -> int:
    problem = taken_port([(args.host, args.port, "gateway, --port"),
                          (args.host, args.metrics_port, "gateway metrics, --metrics-port"),
                          (args.host, args.http_port, "gateway HTTP, --http-port"),
                          (args.host, args.up_metrics_port, "up metrics, --up-metrics-port")])
    if not Path(args.model_repository).is_dir():
        problem = (f"--model-repository {args.model_repository}: no such folder; nothing was "
                   "started")
    if problem:
        say(problem)
        return 1
    access = (("--api-keys-file", str(Path(args.api_keys_file).resolve()))
              if args.api_keys_file else ()) + (("--insecure",) if args.insecure else ())
    mesh = LocalMesh(args.model_repository, devices(args.devices, args.workers),
                     args.redis_url, args.host, args.port, args.metrics_port, args.log_level,
                     gateways=args.gateways, tls_dir=args.tls_dir,
                     restart_limit=args.restart_limit, http_port=args.http_port,
                     batchers=args.batchers, gateway_flags=access)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    failure = ""  # why the mesh stopped, when it was not asked to
    try:
        from meshserve.common import metrics

        up_metrics_port = metrics.serve(mesh.metrics.registry, args.up_metrics_port, args.host)
        up_task = asyncio.create_task(mesh.start())
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait([up_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        if up_task.done() and up_task.exception() is None:
            announce(mesh, args, up_metrics_port)
            await asyncio.wait([stop_task, mesh.fatal], return_when=asyncio.FIRST_COMPLETED)
            if mesh.fatal.done():
                failure = mesh.fatal.result()
        elif up_task.done():
            e = up_task.exception()
            failure = f"start-up failed: {e if isinstance(e, RuntimeError) else repr(e)}"
        else:
            up_task.cancel()
            with contextlib.suppress(BaseException):
                await up_task
        if failure:
            mesh.say(f"{failure}; stopping the mesh")
    finally:
        mesh.say("stopping: gateway, batcher, then workers and cache")
        await mesh.stop()
    # The cause once more as the very last line, below the services' own stop messages.
    mesh.say(f"stopped: {failure}" if failure else "stopped")
    mesh.out.flush()
    return 1 if failure else 0


def announce(mesh: LocalMesh, args: argparse.Namespace, up_metrics_port: int | None) -> None:
    port = mesh.gateway_address.rsplit(":", 1)[1]
    gateways = f" ({args.gateways} gateways, {args.batchers} batchers)" \
        if args.gateways > 1 or args.batchers > 1 else ""
    mesh.say(f"meshserve is serving on {args.host}:{port}{gateways}")
    addresses = mesh.metrics_addresses()
    if up_metrics_port:
        addresses.append(("up", f"http://{args.host}:{up_metrics_port}/metrics"))
    for i, (name, url) in enumerate(addresses):
        mesh.say(f"{'metrics:' if i == 0 else '':<9}{name:<10}{url}")
    tls = f" --tls-ca {Path(args.tls_dir) / 'ca.crt'}" if args.tls_dir else ""
    mesh.say("try:  .venv/bin/meshserve infer digits --input-file models/digits/example.json" + tls)
    if mesh.http_port >= 0:
        mesh.say(f"http: curl -s {'https' if tls else 'http'}://{args.host}:{mesh.http_port}"
            "/v2/models/digits" + tls.replace("--tls-ca", "--cacert"))
    mesh.say("stop: Ctrl-C")


async def load_models(target: str, repo: str, tls_dir: str = "", out=None) -> None:
    import grpc

    from meshserve.client import AsyncClient

    tls = {"tls_ca": str(Path(tls_dir) / "ca.crt")} if tls_dir else {}
    api_key = os.environ.get("MESHSERVE_API_KEY", "")
    async with AsyncClient(target, api_key=api_key, **tls) as client:
        # The batcher loaded them (--load all); loading a READY model again would reload it.
        states: dict[str, set[str]] = {}
        try:
            index = await client.index()
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.PERMISSION_DENIED):
                raise
            say("models: loaded by the batcher (--load all); up cannot list them without an "
                "admin key in MESHSERVE_API_KEY", out)
            return
        for m in index.models:
            states.setdefault(m.name, set()).add(m.state)
        for name in sorted(p.parent.name for p in Path(repo).glob("*/config.json")):
            if states.get(name) == {"READY"}:
                say(f"model '{name}' loaded", out)
                continue
            try:
                await client.load_model(name)
                say(f"model '{name}' loaded", out)
            except Exception as e:  # noqa: BLE001 - one bad model must not stop the mesh
                why = (f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError)
                       else str(e))
                say(f"model '{name}' failed to load: {why}", out)


def main(argv: list[str]) -> int:
    from meshserve.common import logs

    logs.setup("INFO")
    return asyncio.run(run(parse(argv)))
