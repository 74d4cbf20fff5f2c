"""The async inference API over a task queue: submit, get, cancel, watch. No grpc here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from meshserve.common.errors import InvalidInput, NotFound
from meshserve.tasks.metrics import TaskMetrics
from meshserve.tasks.queues import TaskQueue
from meshserve.tasks.records import NewTask, State, TaskView, check_task_id

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 256
# A watcher re-reads its task at least this often, in case a change notification was lost
# (Redis pub/sub is at most once, e.g. across a reconnect).
WATCH_RESYNC_S = 5.0


def _unknown(task_id: str) -> NotFound:
    return NotFound(f"unknown task '{task_id}' (never submitted, or forgotten after "
                    "twice its result TTL)")


class AsyncTasks:
    """A task belongs to its submitter (NewTask.owner): get, cancel and watch with another
    owner answer NOT_FOUND, exactly as for an unknown id; idempotency keys are per owner."""

    def __init__(self, queue: TaskQueue, metrics: TaskMetrics | None = None):
        self.queue = queue
        self.metrics = metrics

    async def submit(self, tasks: Sequence[NewTask]) -> list[str]:
        """Task ids in order; a known idempotency key answers its first task's id. All or
        none: Overloaded (RESOURCE_EXHAUSTED) when the new ones would overflow the queue."""
        for t in tasks:
            if len(t.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
                raise InvalidInput(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_CHARS} "
                                   "characters")
        if not tasks:
            return []
        tasks = [replace(t, idempotency_key=f"{t.owner}/{t.idempotency_key}")
                 if t.owner and t.idempotency_key else t for t in tasks]
        ids = await self.queue.submit(tasks)
        if self.metrics is not None:
            self.metrics.submitted.inc(len(tasks))
        return ids

    async def get(self, task_id: str, owner: str = "") -> TaskView:
        view = await self.queue.get(task_id)
        if view.owner != owner:
            raise _unknown(task_id)
        return view

    async def cancel(self, task_id: str, owner: str = "") -> TaskView:
        """A pending task is never run; a running one's result is dropped. A finished task
        is returned unchanged."""
        await self.get(task_id, owner)  # the owner never changes: checked once
        return await self.queue.cancel(task_id)

    async def watch(self, task_id: str, owner: str = "") -> AsyncIterator[TaskView]:
        """The task now, then each change of state, until it is done."""
        check_task_id(task_id)
        await self.get(task_id, owner)
        await self.queue.listen()
        with self.queue.watchers.watch(task_id) as changed:
            last: State | None = None
            while True:
                changed.clear()
                view = await self.queue.get(task_id)
                if view.state != last:
                    last = view.state
                    yield view
                if view.state.done:
                    return
                wait_s = WATCH_RESYNC_S
                if view.state == State.PENDING:  # wake when it would expire
                    left_s = (await self.queue.deadline(task_id) - self.queue.clock()) / 1000
                    wait_s = max(0.001, min(wait_s, left_s + 0.001))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait_s)
