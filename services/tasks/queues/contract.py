"""The task queue contract (TaskQueue) that both backends keep, and what they share.

The state machine: PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, or EXPIRED when a
task waits past its deadline. A runner reads a delivery, `begin`s it (RUNNING), then
`finish`es it (done, at most once) or `release`s it after a transient failure (PENDING
again, delivered again); after max_deliveries deliveries the task is FAILED and
dead-lettered. tests/tasks/test_queue.py runs the same contract tests on both backends.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshserve.tasks.records import (
    Delivery,
    NewTask,
    QueueSettings,
    Started,
    State,
    TaskView,
    new_task_id,
)

log = logging.getLogger(__name__)

GROUP = "runners"
DEAD_LETTER_MAXLEN = 10_000
_VIEW_FIELDS = ("state", "submitted_ms", "deadline_ms", "finished_ms", "expires_ms",
                "error_code", "error_message", "owner")


def consumer_name(index: int) -> str:
    """Unique per runner coroutine and process (a restarted runner is a new consumer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{index}-{new_task_id()[:6]}"


def full_message(length: int, adding: int, max_queue: int) -> str:
    return (f"the task queue is full: {length} tasks queued, {adding} more would exceed "
            f"the bound of {max_queue}; retry later")


def quota_message(held: int, max_per_key: int) -> str:
    return (f"this API key holds {held} tasks (waiting, running, or finished and kept for "
            f"twice the result TTL), at most {max_per_key}: retry once some are forgotten")


class Watchers:
    """Local events for Watch: notify(task_id) wakes every watcher of that task."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[task_id]

    def notify(self, task_id: str) -> None:
        for event in self._events.get(task_id, ()):
            event.set()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A task given up after max_deliveries deliveries (it is FAILED with `error`)."""

    task_id: str
    deliveries: int  # the delivery that gave up: max_deliveries + 1
    error: str


class TaskQueue(Protocol):
    durable: bool
    clock: Callable[[], int]  # the wall clock in ms (records.now_ms; tests pass their own)
    settings: QueueSettings
    watchers: Watchers

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def submit(self, tasks: Sequence[NewTask]) -> list[str]: ...
    async def get(self, task_id: str) -> TaskView: ...
    async def deadline(self, task_id: str) -> int: ...
    async def cancel(self, task_id: str) -> TaskView: ...
    async def length(self) -> int: ...
    async def listen(self) -> None:
        """Makes sure state changes from any process reach `watchers`."""

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest tasks given up (at most DEAD_LETTER_MAXLEN are kept)."""

    # The runner's side.
    async def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]: ...
    async def claim(self, consumer: str, count: int) -> list[Delivery]: ...
    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None: ...
    async def begin(self, d: Delivery) -> Started | str:
        """Started (the runner owns the task now) or why not: gone, done, expired, dead."""

    async def finish(self, d: Delivery, state: State, response: bytes, code: int,
                     message: str) -> bool:
        """Completes a RUNNING task and acknowledges; False when it was already done."""

    async def release(self, d: Delivery, code: int, message: str) -> None:
        """A transient failure: back to PENDING, unacknowledged; claimed again after
        claim_idle_s (one more delivery)."""


