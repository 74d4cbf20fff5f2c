"""`meshserve up` as a real process, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, free_port

MESHSERVE = [sys.executable, "-m", "meshserve.cli"]


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live (not zombie) child processes of pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class Up:
    """`meshserve up ARGS` on free ports with TMPDIR=tmp; its output in tmp/up.log."""

    def __init__(self, tmp: Path, *args: str, port: int | None = None):
        self.tmp = tmp
        self.port = port or free_port()
        self.up_metrics_port = free_port()
        self.http_port = free_port()
        self.log_path = tmp / "up.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["TMPDIR"] = str(tmp)
        self.proc = subprocess.Popen(
            [*MESHSERVE, "up", "--port", str(self.port), "--metrics-port", "0",
             "--up-metrics-port", str(self.up_metrics_port), "--devices", "cpu",
             "--http-port", str(self.http_port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float = 180) -> str:
        deadline = time.monotonic() + timeout_s
        while needle not in (text := self.text()):
            assert self.proc.poll() is None, text[-5000:]
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{text[-5000:]}"
            time.sleep(0.2)
        return text

    def metrics_url(self, service: str) -> str:
        m = re.search(rf"\| (?:metrics:)? +{re.escape(service)} +(http://\S+)", self.text())
        assert m, f"no metrics address of {service}"
        return m.group(1)

    def service_pid(self, name: str) -> int:
        """A service's current pid (its --port-file is named after it)."""
        for pid, cmd in children(self.proc.pid).items():
            if f"/{name}.json " in cmd:
                return pid
        raise AssertionError(f"no process of {name} under {children(self.proc.pid)}")

    def temp_folders(self) -> list[Path]:
        return list(self.tmp.glob("meshserve-up-*"))

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=90)
        finally:
            self._log.close()

    def kill_all(self) -> None:
        """Test clean-up: up and whatever it left."""
        left = children(self.proc.pid) if self.proc.poll() is None else {}
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
