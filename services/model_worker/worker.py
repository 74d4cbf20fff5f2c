"""The worker of one device: the model cache, the compute threads, the Execute stream
and status changes. Imports neither grpc nor protobuf."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from meshserve.common.errors import ConfigError, Internal, MeshError, NotFound
from meshserve.common.grpcutil import code_value
from meshserve.common.repository import ModelRepository
from meshserve.model_worker.execution import BatchOutcome, BatchRequest, run_batch
from meshserve.model_worker.metrics import WorkerMetrics
from meshserve.model_worker.models import LoadedModel, Loader, ModelCache, ModelInfo, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerState:
    worker_id: str
    device: str
    models: tuple[ModelInfo, ...]
    memory_used_bytes: int
    memory_limit_bytes: int  # 0: unbounded
    max_models: int
    in_flight: int
    draining: bool = False


# On a CPU, a batch of a model whose last batch computed faster than this runs on the
# event loop instead of a compute thread (measured: the handoff costs ~100 us of CPU).
INLINE_BELOW_NS = 1_000_000


def error_outcome(batch_id: int, exc: BaseException) -> BatchOutcome:
    message = str(exc) if isinstance(exc, MeshError) else "internal error running the batch"
    return BatchOutcome(batch_id, code=code_value(exc), message=message)


class Worker:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        worker_id: str,
        device: str,
        max_models: int = 8,
        max_memory_bytes: int = 0,
        max_in_flight: int = 2,
        cuda_graphs: bool = True,
        metrics: WorkerMetrics | None = None,
        loader: Loader = load_model,
    ):
        self.worker_id = worker_id
        self.device = device
        self.repository = repository
        self.metrics = metrics or WorkerMetrics()
        self.cache = ModelCache(
            repository, device, max_models=max_models, max_memory_bytes=max_memory_bytes,
            cuda_graphs=cuda_graphs, loader=loader, on_change=self._changed,
            metrics=self.metrics,
        )
        # OpenMP thread counts are per thread: give each compute thread the process's
        # setting (--threads), or torch would run parallel regions on every core from it.
        self._pool = ThreadPoolExecutor(
            max_in_flight, thread_name_prefix="compute",
            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),),
        )
        self._in_flight = 0
        # (model, version) -> its last batch computed in under INLINE_BELOW_NS (CPU only)
        self._quick: dict[tuple[str, str], bool] = {}
        self.draining = False
        self._watchers: set[asyncio.Queue[WorkerState]] = set()

    # --------------------------------------------------------------------------- status

    def status(self) -> WorkerState:
        return WorkerState(
            worker_id=self.worker_id,
            device=self.device,
            models=self.cache.models(),
            memory_used_bytes=self.cache.memory_used_bytes,
            memory_limit_bytes=self.cache.max_memory_bytes,
            max_models=self.cache.max_models,
            in_flight=self._in_flight,
            draining=self.draining,
        )

    def _changed(self) -> None:
        self.metrics.models_loaded.set(self.cache.ready_count())
        state = self.status()
        for queue in self._watchers:
            queue.put_nowait(state)

    async def watch(self) -> AsyncIterator[WorkerState]:
        """The current status, then one status per change (load start, ready, unload,
        eviction), in order."""
        queue: asyncio.Queue[WorkerState] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield self.status()
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def drain(self) -> None:
        """Shutting down: every watcher is told (WatchStatus draining), so batchers send no
        new batches; what is in flight still runs to the end."""
        if not self.draining:
            self.draining = True
            self._changed()

    # -------------------------------------------------------------------------- models

    async def load(self, name: str, version: str = "", reload: bool = False) -> ModelInfo:
        """Loads a version (a no-op when loaded); reload: read its files again even when
        loaded, and swap them in once warmed up."""
        if reload:
            return await self.cache.reload(name, version)
        return await self.cache.load(name, version)

    async def unload(self, name: str, version: str = "") -> None:
        await self.cache.unload(name, version)

    def startup_versions(self, entries: Sequence[str]) -> list[tuple[str, str]]:
        """--load entries as (name, version): 'all', 'name' (its policy's versions),
        'name:version'. With 'all', a model whose config is broken is skipped (logged)."""
        result: list[tuple[str, str]] = []
        for entry in entries:
            name, _, version = entry.partition(":")
            names = self.repository.names() if entry == "all" else [name]
            for n in names:
                if version:
                    result.append((n, version))
                    continue
                try:
                    served = self.repository.served_versions(n)
                except ConfigError as e:
                    if entry != "all":
                        raise
                    log.error("model %s not loaded: %s", n, e)
                    continue
                if not served:
                    raise NotFound(f"model '{n}' has no version to load")
                result.extend((n, str(v)) for v in served)
        return result

    async def load_startup(self, entries: Sequence[str]) -> list[ModelInfo]:
        return [await self.load(n, v) for n, v in self.startup_versions(entries)]

    # ------------------------------------------------------------------------- batches

    async def run(self, batch: BatchRequest) -> BatchOutcome:
        """One batch on a compute thread (or inline, see _run_inline); every failure becomes
        an error outcome."""
        try:
            model = self.cache.acquire(batch.model, batch.version, self.worker_id)
        except MeshError as e:
            return error_outcome(batch.batch_id, e)
        key = (model.config.name, model.version)
        if self.device == "cpu" and self._quick.get(key, False):
            return self._run_inline(batch, model, key)
        loop = asyncio.get_running_loop()
        future = self._pool.submit(run_batch, model.config, model.runner, batch)
        # Released when the thread is done, even if the stream went away meanwhile.
        future.add_done_callback(lambda _: self._release_threadsafe(loop, model))
        try:
            outcome = await asyncio.wrap_future(future)
        except MeshError as e:
            return error_outcome(batch.batch_id, e)
        except Exception as e:  # noqa: BLE001 - a broken model must not break the stream
            log.exception("batch %d of %s:%s failed", batch.batch_id, batch.model, model.version)
            return error_outcome(batch.batch_id, Internal(str(e)))
        self.metrics.executed(model.config.name, model.version, outcome.rows, outcome.compute_ns)
        self._quick[key] = outcome.compute_ns < INLINE_BELOW_NS
        return outcome

    def _run_inline(self, batch: BatchRequest, model: LoadedModel, key: tuple[str, str]
                    ) -> BatchOutcome:
        """A batch of a model that computes in under INLINE_BELOW_NS, on the event loop: on a
        CPU the thread handoff (a wake-up each way) costs more than such a batch."""
        try:
            outcome = run_batch(model.config, model.runner, batch)
        except MeshError as e:
            return error_outcome(batch.batch_id, e)
        except Exception as e:  # noqa: BLE001 - a broken model must not break the stream
            log.exception("batch %d of %s:%s failed", batch.batch_id, batch.model, model.version)
            return error_outcome(batch.batch_id, Internal(str(e)))
        finally:
            self.cache.release(model)
        self.metrics.executed(model.config.name, model.version, outcome.rows, outcome.compute_ns)
        self._quick[key] = outcome.compute_ns < INLINE_BELOW_NS
        return outcome

    def _release_threadsafe(self, loop: asyncio.AbstractEventLoop, model: LoadedModel) -> None:
        try:
            loop.call_soon_threadsafe(self.cache.release, model)
        except RuntimeError:  # the loop is closed: the worker is shutting down
            pass

    async def execute(
        self, requests: AsyncIterator[Sequence[BatchRequest]]
    ) -> AsyncIterator[list[BatchOutcome]]:
        """Runs every batch of every request concurrently; yields the outcomes as they
        complete, everything ready at that moment together. Ends once the requests end
        and every batch is answered; if the caller goes away, pending work is dropped."""
        done: asyncio.Queue[BatchOutcome | None] = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        reading = True

        def start(batch: BatchRequest) -> None:
            self._in_flight += 1
            task = asyncio.ensure_future(self.run(batch))
            pending.add(task)

            def finished(t: asyncio.Task) -> None:
                pending.discard(t)
                self._in_flight -= 1
                if not t.cancelled():
                    exc = t.exception()
                    done.put_nowait(error_outcome(batch.batch_id, exc) if exc else t.result())

            task.add_done_callback(finished)

        async def read() -> None:
            nonlocal reading
            try:
                async for batches in requests:
                    for batch in batches:
                        start(batch)
            finally:
                reading = False
                done.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while reading or pending or not done.empty():
                ready = [await done.get()]
                while not done.empty():
                    ready.append(done.get_nowait())
                outcomes = [o for o in ready if o is not None]
                if outcomes:
                    yield outcomes
            if not reader.cancelled() and reader.exception() is not None:
                log.warning("execute stream ended: %r", reader.exception())
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()
