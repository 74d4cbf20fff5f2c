"""logs.run: how every service's process runs its main coroutine."""

from __future__ import annotations

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
