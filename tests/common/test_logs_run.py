"""logs.run: how every service's process runs its main coroutine. Each case runs in a
process of its own, as a service does (the test process keeps its own loop and collector)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshserve.common import logs

PROBE = """
import asyncio, gc, json
from meshserve.common import logs

async def main():
    print(json.dumps({"frozen": gc.get_freeze_count(), "collects": gc.isenabled(),
                      "loop": type(asyncio.get_running_loop()).__module__}))

logs.run(main(), "probe")
"""


def run_probe(env_value: str | None, code: str = PROBE) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[logs.EVENT_LOOP_ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("choice, loop_module", [(None, "uvloop"), ("uvloop", "uvloop"),
                                                 ("asyncio", "asyncio")])
def test_a_service_runs_on_uvloop_unless_told_asyncio_with_its_imports_frozen(choice,
                                                                              loop_module):
    done = run_probe(choice)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["loop"].split(".")[0] == loop_module
    # Everything imported by then is out of the collector's sight; new objects are still
    # collected.
    assert seen["frozen"] > 10_000 and seen["collects"]


def test_an_unknown_event_loop_ends_the_process_with_one_line_and_exit_code_1():
    done = run_probe("trio")
    assert done.returncode == 1
    assert ("probe cannot run: ValueError: MESHSERVE_EVENT_LOOP must be uvloop or asyncio, "
            "got 'trio'") in done.stderr
    assert "never awaited" not in done.stderr and "Traceback" not in done.stderr


def test_an_expected_failure_ends_the_process_with_exit_code_1():
    done = run_probe(None, "from meshserve.common import logs\n"
                           "async def main():\n    raise ValueError('bad flag')\n"
                           "logs.run(main(), 'probe')\n")
    assert done.returncode == 1 and "probe cannot run: ValueError: bad flag" in done.stderr
