"""`meshserve up`'s supervision with real child processes (tests/up/fake_service.py stands
in for a service): output of any size and bytes, restarts, giving up, port checks."""

from __future__ import annotations

import asyncio
import functools
import io
import socket
import threading
from dataclasses import replace

import pytest

from meshserve import local_mesh
from meshserve.local_mesh import KINDS, MAX_LINE_BYTES, Kind, LocalMesh, Service, ServiceSpec
from tests.conftest import MODELS


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "fake", Kind("tests.up.fake_service", 0))


def run(test):
    """A sync test of an async body (no pytest-asyncio here)."""
    @functools.wraps(test)
    def sync(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return sync


class Stuck(io.StringIO):
    """A terminal that does not read (Ctrl-S): every write blocks until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait()
        return super().write(text)


@run
async def test_a_terminal_that_does_not_read_never_blocks_a_service(tmp_path):
    stuck = Stuck()
    output = local_mesh.Output(stuck, max_pending=1)
    service = Service(ServiceSpec("fake-0", "fake", ("--mode", "noisy")), tmp_path, "INFO",
                      output)
    await service.launch()
    await service.ready()  # it wrote 20 MB on its way there, all read by `up`
    assert await service.proc.wait() == 0
    await service.pump
    assert output.dropped > 0  # what the terminal could not take
    stuck.release.set()
    assert output.flush()
    assert "pieces of output dropped: not read]" in stuck.getvalue()


def test_lines_cut_long_lines_and_keep_any_bytes():
    lines = local_mesh.Lines(max_bytes=10)
    assert lines.feed(b"abc\nde") == ["abc"]
    assert lines.feed(b"f" * 100) == []
    assert lines.feed(b"\n\xff\n") == ["deffffffff ...[line of 102 bytes cut]", "\ufffd"]
    assert lines.feed(b"tail") == [] and lines.flush() == ["tail"]
    assert lines.flush() == []


@run
async def test_a_1mb_line_and_bad_bytes_never_block_the_child(tmp_path):
    out = io.StringIO()
    service = Service(ServiceSpec("fake-0", "fake", ("--mode", "noisy")), tmp_path, "INFO", out)
    await service.launch()
    # The child writes 1 MiB on one line and 20 000 more lines before it is ready: it
    # gets there only if its output is read on.
    await service.ready()
    assert await service.proc.wait() == 0
    await service.pump
    assert service.out.flush()
    shown = out.getvalue().splitlines()
    assert len(shown) == 20_002
    assert shown[0] == f"   fake-0 | {'x' * MAX_LINE_BYTES} ...[line of {1 << 20} bytes cut]"
    assert shown[1] == "   fake-0 | bad bytes: \ufffd\ufffd\x00 end"
    assert shown[-1] == "   fake-0 | line 19999"


@run
async def test_a_crashing_service_is_restarted_then_given_up_on(tmp_path):
    out = io.StringIO()
    mesh = LocalMesh(str(MODELS), [], log_file=out, restart_limit=2, restart_first_s=0.01)
    mesh.fatal = asyncio.get_running_loop().create_future()
    service = await mesh._start(ServiceSpec("fake-0", "fake", ("--mode", "crash")))
    await service.ready()
    supervisor = asyncio.create_task(mesh._supervise(service))
    reason = await asyncio.wait_for(mesh.fatal, 60)
    await supervisor
    assert service.restarts == 2 and service.gave_up
    assert mesh.out.flush()
    assert reason == ("fake-0 crashed 3 times in a row (2 restarts, each ending within 30s); "
                      "giving up on it (last: exit code 3: fake_service cannot run: "
                      "RuntimeError: boom); no fake left")
    text = out.getvalue()
    assert "fake-0 exited unexpectedly (exit code 3: fake_service cannot run: " in text
    assert "restarting it in 0.0s (restart 2)" in text
    metrics = mesh.metrics.registry
    assert metrics.get_sample_value("meshserve_up_restarts_total", {"service": "fake-0"}) == 2
    assert metrics.get_sample_value("meshserve_up_service_gave_up", {"service": "fake-0"}) == 1
    await mesh.stop()
    assert not mesh.tmp.exists()


@run
async def test_giving_up_on_one_of_two_serves_on(tmp_path):
    out = io.StringIO()
    mesh = LocalMesh(str(MODELS), [], log_file=out, restart_limit=0)
    mesh.fatal = asyncio.get_running_loop().create_future()
    crashing = await mesh._start(ServiceSpec("fake-0", "fake", ("--mode", "crash")))
    serving = await mesh._start(ServiceSpec("fake-1", "fake", ("--mode", "serve")))
    await crashing.ready()
    await serving.ready()
    await mesh._supervise(crashing)
    assert not mesh.fatal.done()
    assert mesh.out.flush()
    assert ("fake-0 crashed 1 times in a row (0 restarts, each ending within 30s); giving up "
            "on it (last: exit code 3: fake_service cannot run: RuntimeError: boom); serving "
            "on with 1 other fake(s)") in out.getvalue()
    await mesh.stop()
    assert serving.proc.returncode == 0  # stopped by SIGTERM, in order


def test_taken_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert local_mesh.taken_port([("127.0.0.1", 0, "any"), ("127.0.0.1", -1, "none")]) is None
        assert local_mesh.taken_port([("127.0.0.1", port, "gateway, --port")]) == (
            f"port {port} on 127.0.0.1 (gateway, --port) is in use (another `meshserve up`?); "
            "nothing was started")


def test_the_cause_of_a_stop_is_the_failure_not_the_exit_noise():
    bug = ["2026-11-30 21:02:48,816 WARNING x: model worker disconnected",
           "Traceback (most recent call last):", '  File "x.py", line 1, in f',
           "AttributeError: 'HeldModel' object has no attribute 'x'",
           "Exception ignored in: <function Server.__del__ at 0x7f>",
           "Traceback (most recent call last):", '  File "y.py", line 2, in g',
           "RuntimeError: Event loop is closed",
           "sys:1: RuntimeWarning: coroutine 'AioServer.shutdown' was never awaited"]
    assert local_mesh.stop_cause(bug) == "AttributeError: 'HeldModel' object has no attribute 'x'"
    one_line = ["2026-11-30 21:02:35,108 CRITICAL meshserve.gateway: gateway cannot run: "
                "RuntimeError: could not bind 127.0.0.1:8001", "sys:1: noise"]
    assert local_mesh.stop_cause(one_line) == (
        "gateway cannot run: RuntimeError: could not bind 127.0.0.1:8001")
    assert local_mesh.stop_cause(["2026-11-30 21:02:35,108 INFO x: last words", ""]) == (
        "INFO x: last words")
    assert local_mesh.stop_cause([]) == "no output"


def test_a_restart_binds_the_ports_the_first_start_bound():
    spec = ServiceSpec("gateway", "gateway", ("--http-port", "0", "--batcher", "b:1"),
                       port=0, metrics_port=0)
    bound = spec.bound({"grpc": 4001, "metrics": 4002, "http": 4000})
    assert (bound.port, bound.metrics_port) == (4001, 4002)
    assert bound.flags == ("--http-port", "4000", "--batcher", "b:1")
    fixed = ServiceSpec("gateway", "gateway", ("--http-port", "-1"), metrics_port=-1)
    assert fixed.bound({"grpc": 4001, "metrics": None}) == replace(fixed, port=4001)
