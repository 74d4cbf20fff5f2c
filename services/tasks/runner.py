"""A runner: reads tasks from a queue, runs each through an executor (the gateway's path),
stores the outcome and acknowledges. Many tasks run at once (up to `concurrency`), so the
batcher batches them as it batches synchronous requests.

Tasks are read with a blocking read (XREADGROUP BLOCK: event driven). A timer loop every
claim_idle_s / 3 (an asyncio sleep interval: Redis has no notification for "an entry went
idle") touches the entries still running here, so no one else claims them, and claims
entries idle past claim_idle_s (their runner died), which counts one more delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from meshserve.common import errors
from meshserve.common.backoff import Backoff
from meshserve.common.grpcutil import code_value
from meshserve.tasks.metrics import TaskMetrics
from meshserve.tasks.queues import TaskQueue, consumer_name
from meshserve.tasks.records import CODE_INTERNAL, Delivery, Started, State

log = logging.getLogger(__name__)

# request bytes, seconds left -> response bytes; raises a MeshError.
Executor = Callable[[bytes, float], Awaitable[bytes]]

READ_BLOCK_S = 5.0


class Runner:
    def __init__(self, queue: TaskQueue, execute: Executor, metrics: TaskMetrics | None = None,
                 concurrency: int = 256, index: int = 0):
        if concurrency < 1:
            raise ValueError(f"runner concurrency must be >= 1, got {concurrency}")
        self.queue, self.execute, self.metrics = queue, execute, metrics
        self.concurrency = concurrency
        self.consumer = consumer_name(index)
        self._inflight: dict[str, asyncio.Task] = {}  # entry id -> its task
        self._room = asyncio.Event()
        self._room.set()
        self._main: asyncio.Task | None = None
        self._claimer: asyncio.Task | None = None

    def start(self) -> None:
        self._main = asyncio.create_task(self._read_loop())
        self._claimer = asyncio.create_task(self._claim_loop())

    async def stop(self, grace_s: float) -> None:
        """Stops reading; lets running tasks finish for up to grace_s, then cancels them
        (their entries stay unacknowledged and are claimed by another runner)."""
        for loop in (self._main, self._claimer):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loop
        running = list(self._inflight.values())
        if running:
            _done, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _read_loop(self) -> None:
        backoff = Backoff()
        while True:
            await self._room.wait()
            try:
                deliveries = await self.queue.read(
                    self.consumer, self.concurrency - len(self._inflight), READ_BLOCK_S)
                backoff.reset()
            except Exception as e:  # noqa: BLE001 - e.g. a Redis error: never stop reading
                log.warning("runner %s: reading tasks failed (%s); retrying in %.1fs",
                            self.consumer, e, backoff.delay_s)
                await backoff.wait()
                continue
            for d in deliveries:
                self._spawn(d)

    async def _claim_loop(self) -> None:
        interval_s = self.queue.settings.claim_idle_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.queue.touch(self.consumer, list(self._inflight))
                room = self.concurrency - len(self._inflight)
                if room > 0:
                    claimed = await self.queue.claim(self.consumer, room)
                    if claimed:
                        log.info("runner %s claimed %d stale task(s)", self.consumer, len(claimed))
                    for d in claimed:
                        self._spawn(d)
                if self.metrics is not None:
                    self.metrics.queue_length.set(await self.queue.length())
            except Exception as e:  # noqa: BLE001 - retried at the next tick
                log.warning("runner %s: claiming stale tasks failed: %s", self.consumer, e)

    def _spawn(self, d: Delivery) -> None:
        if d.entry_id in self._inflight:
            return
        task = asyncio.create_task(self._handle(d))
        self._inflight[d.entry_id] = task
        if len(self._inflight) >= self.concurrency:
            self._room.clear()

        def done(_task, entry_id=d.entry_id):
            self._inflight.pop(entry_id, None)
            if len(self._inflight) < self.concurrency:
                self._room.set()

        task.add_done_callback(done)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcomes.labels(outcome).inc()

    async def _handle(self, d: Delivery) -> None:
        try:
            started = await self.queue.begin(d)
            if not isinstance(started, Started):
                self._count({"expired": "expired", "dead": "dead_lettered"}.get(started, "skipped"))
                return
            await self._run(d, started)
        except asyncio.CancelledError:
            raise  # left unacknowledged: claimed by another runner later
        except Exception as e:  # noqa: BLE001 - e.g. Redis down: the entry is claimed later
            log.warning("task %s: could not record its progress (%s); it will be retried",
                        d.task_id, e)

    async def _run(self, d: Delivery, started: Started) -> None:
        timeout_s = (started.deadline_ms - self.queue.clock()) / 1000
        try:
            response = await self.execute(started.request, timeout_s)
        except errors.Unavailable as e:
            await self.queue.release(d, code_value(e), str(e))
            self._count("retried")
            return
        except errors.MeshError as e:
            await self._finish(d, started, State.FAILED, b"", code_value(e), str(e))
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must fail the task, not the runner
            log.exception("task %s failed", d.task_id)
            await self._finish(d, started, State.FAILED, b"", CODE_INTERNAL, "internal error")
            return
        await self._finish(d, started, State.SUCCEEDED, response, 0, "")

    async def _finish(self, d: Delivery, started: Started, state: State, response: bytes,
                      code: int, message: str) -> None:
        if await self.queue.finish(d, state, response, code, message):
            self._count("succeeded" if state == State.SUCCEEDED else "failed")
            if self.metrics is not None:
                self.metrics.submit_to_done_seconds.observe(
                    max(0, self.queue.clock() - started.submitted_ms) / 1000)
        else:
            self._count("dropped")
