"""Nothing in meshserve.tasks imports or calls pickle (requests and results are protobuf)."""

import ast
from pathlib import Path

import meshserve.tasks

BANNED = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}


def test_no_pickle_in_tasks():
    files = sorted(Path(meshserve.tasks.__file__).parent.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Name | ast.Attribute):
                names = {node.id if isinstance(node, ast.Name) else node.attr}
            else:
                continue
            assert not names & BANNED, f"{path.name}:{node.lineno} uses {names & BANNED}"
        assert "pickle" not in path.read_text().lower().replace("no pickle", ""), path.name
