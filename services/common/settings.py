"""Flags with MESHSERVE_* environment defaults, the only place the environment is read.

Each service's config.py declares its flags here and builds one frozen settings object.
"""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any


class Flags:
    """argparse, where every flag --foo-bar also reads MESHSERVE_FOO_BAR."""

    def __init__(self, prog: str, description: str, env: dict[str, str] | None = None):
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self.env = os.environ if env is None else env

    def add(self, flag: str, type: Callable[[str], Any] = str, default: Any = None,
            help: str = "", env: str | None = None) -> None:
        name = env or "MESHSERVE_" + flag.lstrip("-").upper().replace("-", "_")
        if name in self.env:
            default = type(self.env[name])
        self.parser.add_argument(
            flag, type=type, default=default, help=f"{help} [env {name}; default {default!r}]"
        )

    def add_bool(self, flag: str, default: bool, help: str = "") -> None:
        self.add(flag, parse_bool, default, help)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        return self.parser.parse_args(argv)


def defaults(cls: type) -> types.SimpleNamespace:
    """A settings dataclass's field defaults (`d.port`, ...), read without building one
    (some validate fields that have no usable default): the flags take their defaults from
    here, so the dataclass is their only source."""
    return types.SimpleNamespace(**{f.name: f.default for f in fields(cls)
                                    if f.default is not MISSING})


def from_flags(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` built from the parsed flags named as its fields; `given` (e.g. transport=...)
    sets fields that no flag of that name holds, or replaces a flag's value."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given},
               **given)


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def write_port_file(path: str | None, **ports: int | None) -> None:
    """Writes {"grpc": 8001, ...} once the service is serving (tests and `meshserve up`
    start services on port 0 and read the bound ports here)."""
    if not path:
        return
    import json
    import tempfile
    from pathlib import Path

    target = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False) as f:
        json.dump(ports, f)
    Path(f.name).replace(target)
