"""logs.run: how every service's process runs its main coroutine."""

from __future__ import annotations

import asyncio
import gc

import pytest

from meshserve.common import logs


def test_run_takes_what_was_imported_out_of_the_collectors_sight():
    seen = {}

    async def main():
        seen["frozen"] = gc.get_freeze_count()
        seen["still_collects"] = gc.isenabled()

    try:
        logs.run(main(), "test")
    finally:
        gc.unfreeze()
    # Everything imported by then (pytest, numpy, meshserve...) is frozen; new objects are
    # still collected.
    assert seen["frozen"] > 10_000 and seen["still_collects"]


def test_run_ends_an_expected_failure_with_exit_code_1():
    async def main():
        raise ValueError("bad flag")

    try:
        with pytest.raises(SystemExit) as exited:
            logs.run(main(), "test")
    finally:
        gc.unfreeze()
    assert exited.value.code == 1


@pytest.mark.parametrize("choice, loop_module", [(None, "uvloop"), ("uvloop", "uvloop"),
                                                 ("asyncio", "asyncio")])
def test_a_service_runs_on_uvloop_unless_told_asyncio(monkeypatch, choice, loop_module):
    if choice is None:
        monkeypatch.delenv(logs.EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.EVENT_LOOP_ENV, choice)
    seen = {}

    async def main():
        seen["loop"] = type(asyncio.get_running_loop()).__module__

    try:
        logs.run(main(), "test")
    finally:
        gc.unfreeze()
    assert seen["loop"].split(".")[0] == loop_module


def test_an_unknown_event_loop_ends_the_process_with_exit_code_1(monkeypatch, caplog):
    monkeypatch.setenv(logs.EVENT_LOOP_ENV, "trio")
    main = asyncio.sleep(0)
    with pytest.raises(SystemExit) as exited:
        logs.run(main, "test")
    assert exited.value.code == 1
    assert main.cr_frame is None  # closed, not left "never awaited"
    assert "MESHSERVE_EVENT_LOOP must be uvloop or asyncio, got 'trio'" in caplog.text
