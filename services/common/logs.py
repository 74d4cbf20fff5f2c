"""One log format for every service; client strings made safe for a log line; one-line
start-up failures."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from meshserve.common.errors import MeshError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# A client-supplied string in a log line: at most this many characters.
CLIP_CHARS = 200
# Any one log message (after formatting): at most this many characters, on one line.
MESSAGE_CHARS = 8192
# The items of a client-supplied list (a shape) shown in a log line.
CLIP_ITEMS = 16


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """A client-supplied value (model name, id, shape, an error quoting one) fit for a log
    line: at most `limit` characters, then `...[N chars]` with the original length; control
    characters and line breaks escaped (a client cannot forge or split log lines)."""
    if isinstance(value, (list, tuple)) and len(value) > CLIP_ITEMS:
        value = f"[{', '.join(map(str, value[:CLIP_ITEMS]))}, ...] ({len(value)} items)"
    text = value if isinstance(value, str) else str(value)
    n = len(text)
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return head if n <= limit else f"{head}...[{n} chars]"


def redact_url(url: str) -> str:
    """A URL (a Redis URL) fit for a log line: its password, in the authority
    (redis://user:SECRET@host) or a `password=` query parameter, replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if "password=" in parts.query:
        query = [(k, "***" if k == "password" else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


class _OneLine(logging.Filter):
    """Every message on one line and bounded, whatever a caller passed (tracebacks,
    added by the formatter after this, keep their lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is the handler's to report
            return True
        if len(message) > MESSAGE_CHARS or not message.isprintable():
            record.msg, record.args = clip(message, MESSAGE_CHARS), None
        return True


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)


# What a service cannot start or run without (a taken port, a bad flag or file, a peer
# that refuses): one line naming the cause, not a traceback.
EXPECTED_FAILURES = (OSError, ValueError, RuntimeError, LookupError, MeshError)


# MESHSERVE_EVENT_LOOP=asyncio: the standard library's loop instead of uvloop.
EVENT_LOOP_ENV = "MESHSERVE_EVENT_LOOP"


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for a service (None: asyncio's). Every internal hop costs an event
    loop wake-up and a socket write per message; uvloop's cost a fraction of asyncio's
    (measured: batcher and worker CPU per inference -15 to -35%)."""
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop")
    if choice == "asyncio":
        return None
    if choice != "uvloop":
        raise ValueError(f"{EVENT_LOOP_ENV} must be uvloop or asyncio, got {clip(choice)!r}")
    import uvloop  # a dependency; imported only by a service's process

    return uvloop.new_event_loop


# Set by `meshserve up` for its children: the pid that the child dies with.
PARENT_ENV = "MESHSERVE_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """Under `meshserve up` (PARENT_ENV set), SIGKILL when `up` dies, however it dies
    (Linux: PR_SET_PDEATHSIG); if it died before this, exit now."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):
        raise SystemExit(1)


def run(main: Coroutine, service: str) -> None:
    """asyncio.run(main) for a service's process. A failure of an expected kind ends the
    process with one log line naming the cause (the traceback at DEBUG) and exit code 1;
    anything else keeps its traceback (a bug to see)."""
    log = logging.getLogger(f"meshserve.{service}")
    try:
        die_with_parent()
    except SystemExit:
        main.close()
        raise
    try:
        try:
            loop_factory = event_loop_factory()
        except BaseException:
            main.close()  # never to run (not "never awaited")
            raise
        # What is imported by now lives as long as the process: out of the collector's
        # sight. Every full collection walked all of it (torch alone is ~150k objects):
        # ~20% of the gateway's CPU under load went to the collector before this.
        gc.collect()
        gc.freeze()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except EXPECTED_FAILURES as e:
        log.debug("%s stopped", service, exc_info=True)
        log.critical("%s cannot run: %s: %s", service, type(e).__name__, e)
        raise SystemExit(1) from None
