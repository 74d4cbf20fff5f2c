"""README's python and bash snippets, run as written against a real `meshserve up` (its
addresses put where the snippets say 127.0.0.1:8001 and localhost:8000). Snippets of `make` targets (CI runs
those) and snippets marked `<!-- not run by tests/test_readme.py: why -->` are skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.up.conftest import Up

README = ROOT / "README.md"
SKIP_MARK = "<!-- not run by tests/test_readme.py"


def snippets() -> list[tuple[int, str, str]]:
    """(line, language, code) of every snippet to run, in README order."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"^```(\w+)\n(.*?)^```$", text, re.S | re.M):
        lang, code = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if lang not in ("python", "bash") or before.startswith(SKIP_MARK):
            continue
        if all(not c.strip() or c.startswith("make ") for c in code.splitlines()):
            continue  # make targets: what CI itself runs
        found.append((line, lang, code))
    return found


def test_readme_has_snippets_to_run():
    langs = [lang for _, lang, _ in snippets()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 3, langs


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("readme"))
    up.wait_for("meshserve is serving")
    yield up
    up.stop()
    up.kill_all()


@pytest.mark.parametrize("line,lang,code", snippets(), ids=lambda v: str(v)[:20])
def test_snippet_runs_as_written(mesh, line, lang, code):
    env = {**os.environ, "MESHSERVE_URL": mesh.url}
    if lang == "python":
        command = [sys.executable, "-c", code.replace("127.0.0.1:8001", mesh.url)]
    else:
        command = ["bash", "-euo", "pipefail", "-c",
                   code.replace("localhost:8000", f"localhost:{mesh.http_port}")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, f"README.md line {line}:\n{result.stdout}\n{result.stderr}"
    if "example.json" in code and "submit" not in code:
        assert "[8]" in result.stdout, result.stdout  # the example's digit
