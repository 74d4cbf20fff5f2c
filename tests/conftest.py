"""Fixtures shared by every test layer: the repository's models, free ports, a real
redis-server, and service processes started the way Kubernetes starts them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free port, no persistence; can be stopped and restarted
    on the same port (to test a cache that outlives its Redis)."""

    def __init__(self, tmp: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class ServiceProcess:
    """`python -m meshserve.<service> ...` as its own process; its bound ports come from
    --port-file once it is serving."""

    def __init__(self, service: str, args: list[str], tmp: Path, env: dict | None = None):
        self.service = service
        if service == "gateway" and "--http-port" not in args:
            args = [*args, "--http-port", "0"]  # never the default 8000 in tests
        self.port_file = tmp / f"{service}-{time.monotonic_ns()}.ports.json"
        self.log_path = tmp / f"{service}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"meshserve.{service}", *args,
             "--port-file", str(self.port_file)],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.ports: dict = {}

    def wait_ready(self, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited {self.proc.returncode}:\n{self.output()}")
            if self.port_file.exists():
                self.ports = json.loads(self.port_file.read_text())
                return self.ports
            time.sleep(0.05)
        raise RuntimeError(f"{self.service} not ready after {timeout_s}s:\n{self.output()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        """A gateway's HTTP address as tritonclient.http takes it (host:port)."""
        return f"127.0.0.1:{self.ports['http']}"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_service(tmp_path):
    """start_service("model_worker", ["--port", "0", ...]) -> a ready ServiceProcess."""
    started: list[ServiceProcess] = []

    def start(service: str, args: list[str], env: dict | None = None, wait=True):
        proc = ServiceProcess(service, args, tmp_path, env)
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()
