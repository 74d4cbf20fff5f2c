"""`meshserve up` as a supervisor, run as a user runs it: a worker SIGKILLed under load
comes back and serves again with no request failing; hostile requests cannot flood or
split its log; killing `up` leaves no service behind; a second `up` on taken ports stops
at once with one line; SIGHUP stops cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest

from meshserve.client import AsyncClient
from tests.conftest import ROOT, free_port
from tests.up.conftest import MESHSERVE, Up, alive, children


def scrape(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


@pytest.fixture
def up2(tmp_path):
    up = Up(tmp_path, "--workers", "2")
    yield up
    up.kill_all()


def test_worker_killed_under_load_comes_back_and_serves_again(up2):
    up = up2
    up.wait_for("meshserve is serving")
    worker_metrics = up.metrics_url("worker-0")
    victim = up.service_pid("worker-0")
    failures: list[str] = []
    answered = 0

    async def load() -> None:
        nonlocal answered
        x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        stop = asyncio.Event()

        async def client(k: int) -> None:
            nonlocal answered
            async with AsyncClient(up.url) as c:
                while not stop.is_set():
                    try:
                        r = await c.infer("digits", {"input": x}, use_cache=False, timeout_s=30)
                        assert r.outputs["predictions"].shape == (1,)
                        answered += 1
                    except Exception as e:  # noqa: BLE001 - every failure is collected
                        failures.append(repr(e))

        async def faults() -> None:
            await asyncio.sleep(2)
            os.kill(victim, signal.SIGKILL)
            # Back: started again on its ports, its models loaded, and the batcher sends it
            # batches again (the new process counts only its own).
            await asyncio.to_thread(up.wait_for, "worker-0 is back on port")
            while scrape(worker_metrics, "meshserve_worker_batch_size_count") == 0:
                await asyncio.sleep(0.2)
            stop.set()

        await asyncio.gather(faults(), *(client(k) for k in range(8)))

    asyncio.run(asyncio.wait_for(load(), 240))
    assert failures == [], failures[:5]
    assert answered > 100
    assert up.service_pid("worker-0") != victim
    text = up.text()
    assert "worker-0 exited unexpectedly (killed by SIGKILL); restarting it in 0.5s" in text
    restarts = scrape(f"http://127.0.0.1:{up.up_metrics_port}/metrics",
                      'meshserve_up_restarts_total{service="worker-0"}')
    assert restarts == 1
    # Closing the terminal (SIGHUP) stops the mesh as Ctrl-C does, and cleans up.
    services = children(up.proc.pid)
    assert up.stop(signal.SIGHUP) == 0
    assert up.text().rstrip().endswith("up | stopped")
    assert not any(alive(pid) for pid in services)
    assert up.temp_folders() == []


@pytest.fixture
def up1(tmp_path):
    up = Up(tmp_path)
    yield up
    up.kill_all()


def test_hostile_requests_cannot_block_the_log_and_sigkill_of_up_leaves_nothing(up1):
    up = up1
    up.wait_for("meshserve is serving")
    x = np.zeros((1, 64), np.float32)

    async def flood() -> None:
        async with AsyncClient(up.url) as c:
            async def bad(k: int) -> None:
                # A 1 MB model name, or a version with a newline that would forge a log
                # line: each refused, each logged (errors are logged whatever the sampling).
                if k % 2:
                    name, version = "m" * 1_000_000 + str(k), ""
                else:
                    name, version = "digits", f"{k}\nFORGED ERROR line"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.infer(name, {"input": x}, version=version, timeout_s=60)
                assert e.value.code() in (grpc.StatusCode.NOT_FOUND,
                                          grpc.StatusCode.INVALID_ARGUMENT)

            for wave in range(5):
                await asyncio.gather(*(bad(wave * 40 + k) for k in range(40)))
            r = await c.infer("digits", {"input": x}, timeout_s=30)
            assert r.outputs["predictions"].shape == (1,)

    asyncio.run(flood())
    lines = up.text().splitlines()
    assert max(map(len, lines)) < 20_000
    assert re.search(r"m{100}\.\.\.\[100000\d chars\]", "\n".join(lines))
    forged = [line for line in lines if "FORGED" in line]
    assert forged and all("\\nFORGED ERROR line" in line for line in forged), forged[:3]

    services = children(up.proc.pid)
    assert len(services) == 4  # cache, worker, batcher, gateway
    up.proc.kill()
    up.proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in services) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in services if alive(pid)] == []


def test_second_up_on_taken_ports_fails_at_once_with_one_line(tmp_path):
    for flag in ("--port", "--metrics-port", "--up-metrics-port", "--http-port"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            ports = {"--port": str(free_port()), "--metrics-port": "-1",
                     "--up-metrics-port": "-1", "--http-port": "-1", flag: str(port)}
            env = {**os.environ, "TMPDIR": str(tmp_path)}
            result = subprocess.run(
                [*MESHSERVE, "up", "--devices", "cpu", *[a for kv in ports.items() for a in kv]],
                capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert result.returncode == 1
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert len(lines) == 1, result.stdout
        assert f"port {port} on 127.0.0.1" in lines[0] and flag in lines[0]
        assert "is in use" in lines[0] and lines[0].endswith("nothing was started")
        assert list(tmp_path.glob("meshserve-up-*")) == []


def test_up_without_its_model_repository_says_so_in_one_line(tmp_path):
    result = subprocess.run(
        [*MESHSERVE, "up", "--devices", "cpu", "--port", "0", "--metrics-port", "-1",
         "--http-port", "-1", "--model-repository", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.splitlines() == [
        f"       up | --model-repository {tmp_path / 'none'}: no such folder; nothing was "
        "started"]


def test_up_on_a_public_address_serves_with_the_keys_it_is_given(tmp_path, monkeypatch):
    """A gateway refuses a non-loopback address without keys; `up --api-keys-file` gives
    them, and up's own calls use the admin key in MESHSERVE_API_KEY."""
    import hashlib
    import json

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{
        "name": "ops", "sha256": hashlib.sha256(b"k-admin").hexdigest(), "models": ["*"],
        "scopes": ["infer", "admin"]}]}))
    monkeypatch.setenv("MESHSERVE_API_KEY", "k-admin")
    up = Up(tmp_path, "--host", "0.0.0.0", "--api-keys-file", str(keys))
    try:
        up.wait_for("meshserve is serving")
        assert "model 'digits' loaded" in up.text()
        x = np.zeros((1, 64), np.float32)

        async def calls() -> None:
            async with AsyncClient(up.url) as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await anonymous.infer("digits", {"input": x}, timeout_s=30)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncClient(up.url, api_key="k-admin") as client:
                r = await client.infer("digits", {"input": x}, timeout_s=30)
                assert r.outputs["predictions"].shape == (1,)

        asyncio.run(calls())
    finally:
        up.kill_all()
