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

from meshserve.common.errors import ConfigError
from meshserve.common.logs import clip


class Flags:
    """argparse, where every flag --foo-bar also reads MESHSERVE_FOO_BAR."""

    def __init__(self, prog: str, description: str, env: dict[str, str] | None = None):
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self.env = os.environ if env is None else env

    def add(self, flag: str, type: Callable[[str], Any] = str, default: Any = None,
            help: str = "", env: str | None = None) -> None:
        name = env or "MESHSERVE_" + flag.lstrip("-").upper().replace("-", "_")
        if name in self.env:
            try:
                default = type(self.env[name])
            except (ValueError, argparse.ArgumentTypeError) as e:
                self.parser.error(f"environment {name}={clip(self.env[name])}: {e}")
        self.parser.add_argument(
            flag, type=type, default=default, help=f"{help} [env {name}; default {default!r}]"
        )

    def add_bool(self, flag: str, default: bool, help: str = "") -> None:
        self.add(flag, parse_bool, default, help)

    def add_service(self, d: types.SimpleNamespace, host: str = "", port: str = "") -> None:
        """The flags every service has, with the defaults `d` (defaults(Settings)): --host,
        --port, --metrics-port, --port-file, --log-level; host and port: their help."""
        self.add("--host", str, d.host, host or "address to bind (0.0.0.0: every interface)")
        self.add("--port", _port(0), d.port, port or "gRPC port (0: any free port)")
        self.add("--metrics-port", _port(-1), d.metrics_port,
                 "Prometheus port (-1: off, 0: any free port)")
        self.add("--port-file", str, d.port_file, "write the bound ports here as JSON once serving")
        self.add("--log-level", parse_log_level, d.log_level, "DEBUG, INFO, WARNING or ERROR")

    def add_redis_url(self, default: str, help: str) -> None:
        """--redis-url, also read from REDIS_URL (MESHSERVE_REDIS_URL wins)."""
        self.add("--redis-url", str, self.env.get("REDIS_URL", default),
                 f"{help} (also env REDIS_URL)")

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        return self.parser.parse_args(argv)

    def build(self, cls: type, args: argparse.Namespace, **given: Any) -> Any:
        """`cls` built from the parsed flags named as its fields; `given` (e.g. transport=...)
        sets fields that no flag of that name holds, or replaces a flag's value. A value the
        settings refuse (ConfigError) exits with the usage and one line, no traceback."""
        try:
            return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                          if f.name not in given}, **given)
        except ConfigError as e:
            self.parser.error(str(e))
            raise  # unreachable: error() exits


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_log_level(value: str) -> str:
    level = str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not DEBUG, INFO, WARNING or ERROR")
    return level


def _port(lowest: int) -> Callable[[str], int]:
    """A port number in lowest..65535 (0: any free port; -1, where allowed: off)."""
    def parse(value: str) -> int:
        try:
            port = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
        if not lowest <= port <= 65535:
            raise argparse.ArgumentTypeError(f"{port} is not in {lowest}..65535")
        return port
    parse.__name__ = "port"
    return parse


def defaults(cls: type) -> types.SimpleNamespace:
    """A settings dataclass's field defaults (`d.port`, ...), read without building one
    (some validate fields that have no usable default): the flags take their defaults from
    here, so the dataclass is their only source."""
    return types.SimpleNamespace(**{f.name: f.default for f in fields(cls)
                                    if f.default is not MISSING})


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
