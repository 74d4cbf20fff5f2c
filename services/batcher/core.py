"""The batcher's core: per model version queues, one dispatcher task per queue, batches
sent to workers with retries, model placement (load/unload), and per-stream sessions.

Pure domain: workers are reached through WorkerLink objects (connection.py over gRPC);
requests and results are records.py records.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.batcher.adaptive import AdaptivePolicy, ArrivalRate
from meshserve.batcher.queue import BatchPolicy, BatchQueue, Plan
from meshserve.batcher.records import Batch, BatchOutputs, InferResult, RawTensor, Request
from meshserve.batcher.stats import ModelStats, Statistics
from meshserve.batcher.workers import Key, PooledWorker, WorkerPool
from meshserve.common import tracing
from meshserve.common.errors import (
    Cancelled,
    ConfigError,
    FailedPrecondition,
    Internal,
    InvalidInput,
    MeshError,
    NotFound,
    Unavailable,
)
from meshserve.common.logs import clip
from meshserve.common.model_control import Control
from meshserve.common.repository import ModelConfig, ModelRepository

log = logging.getLogger(__name__)

LOAD_RETRY_AFTER_S = 5.0
LOAD_READY_WAIT_S = 30.0
# The start of the message of requests refused by a draining batcher (never queued, so a
# client may send them again elsewhere).
DRAINING = "the batcher is draining"


@dataclass(frozen=True, slots=True)
class BatcherOptions:
    max_retries: int = 2
    max_batch_size: int = 0  # 0: the model config's
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    adaptive: bool | None = None  # None: the model config's
    # While every worker that was connected is gone (a restart), requests wait this long
    # for one to come back before they are answered UNAVAILABLE (0: at once).
    rejoin_wait_s: float = 10.0


@dataclass(frozen=True, slots=True)
class VersionState:
    model: str
    version: str
    state: str  # READY, LOADING, UNAVAILABLE
    reason: str
    workers: tuple[str, ...]
    graph_buckets: tuple[int, ...] = ()  # replayed as CUDA graphs by a holder
    eager_buckets: tuple[int, ...] = ()  # run eagerly by a holder: capture failed


class _ModelQueue:
    """A queue with its config, adaptive state and dispatcher task."""

    def __init__(self, key: Key, config: ModelConfig, queue: BatchQueue):
        self.key, self.config, self.queue = key, config, queue
        self.rate = ArrivalRate(queue.now)
        self.adaptive = self._adaptive()
        self.task: asyncio.Task | None = None

    def _adaptive(self) -> AdaptivePolicy | None:
        p = self.queue.policy
        if not p.adaptive or p.max_batch_size == 0:
            return None
        return AdaptivePolicy(p.batch_rows, p.target_latency_us, p.preferred_batch_sizes)

    def reconfigure(self, config: ModelConfig, policy: BatchPolicy) -> None:
        """The model was (re)loaded with another config: queued requests stay, in order."""
        self.config = config
        self.queue.set_policy(policy)
        self.adaptive = self._adaptive()


class Batcher:
    def __init__(self, repository: ModelRepository, pool: WorkerPool,
                 options: BatcherOptions = BatcherOptions(), stats: Statistics | None = None,
                 now: Callable[[], float] = time.monotonic):
        self.repository, self.pool, self.options = repository, pool, options
        self.stats = stats or Statistics()
        self.now = now
        self._queues: dict[Key, _ModelQueue] = {}
        self._batch_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._wanted: set[Key] = set()
        self._unwanted: set[Key] = set()
        self._loads: dict[Key, asyncio.Task] = {}
        self._load_errors: dict[Key, tuple[float, str]] = {}
        # The cluster's model control (common.model_control), as last applied.
        self.controls: dict[str, Control] = {}
        # When the last connected worker went away (None: one is connected, or none ever was).
        self._ever_connected = bool(self.pool.connected())
        self._all_down_since: float | None = None
        self.pool.listeners.append(self._on_pool_change)
        # SIGTERM: new requests are refused (the client sends them to another batcher);
        # queued and running ones are finished.
        self.draining = False

    # ------------------------------------------------------------------ intake

    def submit(self, request_id: int, model: str, version: str, inputs: list[RawTensor],
               outputs: list[str], priority: int, timeout_us: int,
               traceparent: str = "") -> Request:
        """Validates cheaply and queues a request; its future gets an InferResult.
        Raises NotFound, InvalidInput or Overloaded at once (Unavailable when draining)."""
        if self.draining:
            raise Unavailable(f"{DRAINING}: send the request to another batcher")
        mq = self._queue(model, version)
        q, config = mq.queue, mq.config
        ordered = _ordered_inputs(config, inputs)
        if config.max_batch_size > 0:
            rows = {t.rows if t.shape else -1 for t in ordered}
            if len(rows) != 1 or -1 in rows:
                raise InvalidInput(
                    f"inputs of a request must all have the same number of rows (dimension 0), "
                    f"got {[list(t.shape) for t in ordered]}"
                )
            n_rows = rows.pop()
            if n_rows < 1:
                raise InvalidInput("a request must carry at least one row")
        else:
            n_rows = 1
        now = self.now()
        request = Request(
            request_id=request_id, model=model, version=version, inputs=tuple(ordered),
            outputs=tuple(outputs), rows=n_rows, level=q.level_of(priority), enqueued_s=now,
            deadline_s=q.deadline_of(timeout_us),
            future=asyncio.get_running_loop().create_future(), traceparent=traceparent,
        )
        q.put(request)
        mq.rate.observe(n_rows)
        self.stats.set_depth(model, version, len(q))
        return request

    def cancel(self, request: Request) -> None:
        """The caller went away: drop the request if queued, answer it CANCELLED."""
        mq = self._queues.get((request.model, request.version))
        if mq is None or not mq.queue.cancel(request):
            request.cancelled = True
            self._answer(request, InferResult(request.request_id, Cancelled(
                "request cancelled by its caller")))

    def _queue(self, model: str, version: str) -> _ModelQueue:
        key = (model, version)
        mq = self._queues.get(key)
        if mq is not None:
            return mq
        config = self.repository.config(model)  # NotFound for an unknown model
        if not version.isdigit() or int(version) not in self.repository.versions(model):
            raise NotFound(f"model '{model}' has no version {version!r}")
        queue = BatchQueue(model, version, self._policy(config), self.now)
        queue.on_drop = lambda r, e: self._answer(r, InferResult(r.request_id, e))
        mq = self._queues[key] = _ModelQueue(key, config, queue)
        mq.task = self._spawn(self._dispatch(mq))
        return mq

    def _policy(self, config: ModelConfig) -> BatchPolicy:
        o = self.options
        return BatchPolicy.from_config(
            config.max_batch_size, config.batching,
            max_batch_size_override=o.max_batch_size,
            max_queue_delay_us_override=o.max_queue_delay_us,
            max_queue_size_override=o.max_queue_size, adaptive_override=o.adaptive,
        )

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, mq: _ModelQueue) -> None:
        q, key = mq.queue, mq.key
        while True:
            await q.wait_nonempty()
            try:
                worker = await self._acquire(key, q)
            except MeshError as e:
                q.fail_all(e)
                self.stats.set_depth(*key, len(q))
                continue
            if worker is None:
                continue

            def plan(w: PooledWorker = worker) -> Plan | None:
                if mq.adaptive is None:
                    return None
                return mq.adaptive.plan(w.profile(key), mq.rate.rows_per_s)

            # Only our lease on it: the worker is idle, so a lone request goes at once.
            batch = await q.next_batch(
                next(self._batch_ids), idle=lambda w=worker: w.outstanding <= 1, plan=plan
            )
            self.stats.set_depth(*key, len(q))
            if batch is None:
                self.pool.release(worker)
                continue
            self._spawn(self._run_batch(key, batch, worker))

    async def _acquire(self, key: Key, q: BatchQueue | None,
                       avoid: frozenset[str] = frozenset()) -> PooledWorker | None:
        """A READY worker with a free slot (its slot taken); None if q emptied meanwhile.
        Workers in `avoid` (those a batch failed on) are used only if no other holds it."""
        while True:
            if q is not None:
                q.purge()
                if not len(q):
                    return None
            others = any(w.address not in avoid for w in self.pool.holders(key))
            w = self.pool.pick(key, avoid if others else frozenset())
            if w is not None:
                self.pool.acquire(w)
                return w
            if not self.pool.holders(key) and not self.pool.loading(key):
                self._ensure_loading(key)
            deadline = q.next_deadline_s() if q is not None else None
            rejoin = self._rejoin_deadline()
            if rejoin is not None:
                deadline = rejoin if deadline is None else min(deadline, rejoin)
            await self.pool.wait_change(None if deadline is None else deadline - self.now())

    def _rejoin_deadline(self) -> float | None:
        """Until when requests wait for a worker to come back (None: not waiting)."""
        if self._all_down_since is None:
            return None
        return self._all_down_since + self.options.rejoin_wait_s

    def _ensure_loading(self, key: Key) -> None:
        """Starts loading a wanted model nobody holds; raises Unavailable when it cannot."""
        model, version = key
        if key in self._loads:
            return
        if not self.pool.connected():
            rejoin = self._rejoin_deadline()
            if rejoin is not None and self.now() < rejoin:
                return  # the workers are restarting: wait for one (see _acquire)
            raise Unavailable(
                f"no model worker is serving {model} version {version}: "
                f"no model worker is connected ({len(self.pool.workers)} known)"
            )
        if key in self._unwanted or key not in self._wanted:
            raise Unavailable(f"model {model} version {version} is not loaded")
        failed = self._load_errors.get(key)
        if failed is not None and self.now() - failed[0] < LOAD_RETRY_AFTER_S:
            raise Unavailable(f"no model worker is serving {model} version {version}: {failed[1]}")
        self._start_load(key)

    def _start_load(self, key: Key) -> asyncio.Task:
        task = self._loads.get(key)
        if task is None:
            task = self._loads[key] = self._spawn(self._load(key))
            task.add_done_callback(lambda _t: self._loads.pop(key, None))
        return task

    async def _load(self, key: Key) -> None:
        model, version = key
        w = self.pool.pick_for_load(key)
        if w is None:
            self._load_errors[key] = (self.now(), "no model worker is connected")
            self.pool.notify()
            return
        log.info("loading %s version %s on %s", clip(model), clip(version), w.address)
        w.loading.add(key)
        self.pool.notify()
        try:
            await w.link.load(model, version)
        except Exception as e:  # noqa: BLE001 - a failed load is reported, never raised
            log.warning("loading %s version %s on %s failed: %s", clip(model), clip(version),
                        w.address, clip(e))
            self._load_errors[key] = (self.now(), f"{w.address}: {e}")
            w.loading.discard(key)
            self.pool.notify()
            return
        self._load_errors.pop(key, None)
        # Load returns once ready; wait for the worker's status to say so.
        limit = self.now() + LOAD_READY_WAIT_S
        while w.connected and not w.ready(key) and self.now() < limit:
            await self.pool.wait_change(1.0)
        w.loading.discard(key)
        self.pool.notify()

    async def _run_batch(self, key: Key, batch: Batch, worker: PooledWorker) -> None:
        model, version = key
        attempts = 0
        failed_on: set[str] = set()
        while True:
            attempts += 1
            error: MeshError
            try:
                outcome = await worker.link.execute(batch)
            except MeshError as e:
                outcome, error, retry = None, e, isinstance(e, Unavailable)
            finally:
                self.pool.release(worker)
            if outcome is not None:
                if outcome.error is None:
                    self._finish(batch, worker, outcome)
                    return
                error = outcome.error
                retry = isinstance(error, NotFound)
                if retry:
                    # The worker's state drifted from its report: do not send it this model.
                    worker.drifted.add(key)
            failed_on.add(worker.address)
            if not retry:
                self._answer_all(batch, error)
                return
            if all(r.done for r in batch.requests):
                return
            if attempts > self.options.max_retries:
                self._answer_all(batch, Unavailable(
                    f"no model worker is serving {model} version {version}: {error} "
                    f"(after {attempts} attempts)"))
                return
            log.info("batch %d of %s version %s failed on %s (%s); retrying",
                     batch.batch_id, clip(model), clip(version), worker.address, clip(error))
            try:
                worker = await self._acquire(key, None, frozenset(failed_on))
            except MeshError as e:
                self._answer_all(batch, e)
                return

    def _finish(self, batch: Batch, worker: PooledWorker, outcome) -> None:
        key = (batch.model, batch.version)
        executed = outcome.executed_batch_size or batch.rows
        worker.profile(key).observe(executed, outcome.compute_ns / 1e9)
        self.stats.record_batch(batch.model, batch.version, batch.rows, executed,
                                outcome.compute_ns)
        mq = self._queues.get(key)
        batching = mq is None or mq.config.max_batch_size > 0
        if batching:
            bad = [t for t in outcome.outputs if t.rows != batch.rows]
            if bad or not outcome.outputs:
                self._answer_all(batch, Internal(
                    f"model worker {worker.address} returned "
                    f"{[list(t.shape) for t in outcome.outputs]} for a batch of {batch.rows} rows"))
                return
        # Every result refers to the batch's outputs: no tensor per request here.
        shared = BatchOutputs(outcome.outputs, batching)
        closed_s, compute_ns, rows = batch.closed_s, outcome.compute_ns, batch.rows
        offset = 0
        for r in batch.requests:
            self._answer(r, InferResult(
                r.request_id, None, queue_ns=int((closed_s - r.enqueued_s) * 1e9),
                compute_ns=compute_ns, batch_size=rows, shared=shared, row=offset,
                rows=r.rows, names=r.outputs))
            offset += r.rows

    def _answer_all(self, batch: Batch, error: MeshError) -> None:
        for r in batch.requests:
            self._answer(r, InferResult(
                r.request_id, error, queue_ns=int((batch.closed_s - r.enqueued_s) * 1e9),
                batch_size=batch.rows))

    def _answer(self, r: Request, result: InferResult) -> None:
        """Sets a request's result once; later answers are ignored."""
        if r.future.done():
            return
        r.future.set_result(result)
        if r.on_result is not None:
            r.on_result(r, result)
        if r.withdrawn:
            return
        code = "OK" if result.error is None else result.error.code_name
        queued = result.queue_ns if result.error is None or result.batch_size else None
        total_ns = int((self.now() - r.enqueued_s) * 1e9)
        self.stats.record_request(r.model, r.version, code, total_ns, queued)
        if r.traceparent:
            _trace(r, result, code, total_ns)

    def record_rejected(self, model: str, version: str, error: MeshError) -> None:
        """Counts a request refused at intake (only for known model versions)."""
        if (model, version) in self._queues:
            self.stats.record_request(model, version, error.code_name, 0, None)

    def _on_pool_change(self) -> None:
        if any(w.connected for w in self.pool.workers.values()):
            self._ever_connected, self._all_down_since = True, None
        elif self._ever_connected and self._all_down_since is None:
            self._all_down_since = self.now()
        self.note_reported()
        for mq in self._queues.values():
            mq.queue.wake()

    # ------------------------------------------------------------------ models

    def want(self, models: list[str]) -> list[Key]:
        """Marks models (every version the policy selects) wanted, e.g. from --load. A model
        whose config is broken is skipped (logged; the index shows it UNAVAILABLE)."""
        keys = []
        for name in models:
            try:
                served = self.repository.served_versions(name)
            except ConfigError as e:
                log.error("model %s not loaded: %s", name, e)
                continue
            for v in served:
                key = (name, str(v))
                self._wanted.add(key)
                self._unwanted.discard(key)
                keys.append(key)
        return keys

    async def load_model(self, model: str, versions: list[str]) -> list[VersionState]:
        config = self.repository.config(model)
        on_disk = self.repository.versions(model)
        if not versions:
            versions = [str(v) for v in config.version_policy.select(on_disk)]
        for v in versions:
            if not v.isdigit() or int(v) not in on_disk:
                raise NotFound(f"model '{model}' has no version {v!r} in the model repository")
        keys = [(model, str(int(v))) for v in versions]
        # Every version finishes (each reload swapped or not) before an error is raised.
        results = await asyncio.gather(*(self._load_or_reload(k) for k in keys),
                                       return_exceptions=True)
        # The queues take the config the workers (re)loaded with.
        for key in keys:
            mq = self._queues.get(key)
            if mq is not None and mq.config != config:
                log.info("model %s version %s: its queue takes the reloaded config", *key)
                mq.reconfigure(config, self._policy(config))
        for error in results:
            if isinstance(error, BaseException):
                raise error
        return [s for s in self.model_states(model) if (s.model, s.version) in keys]

    async def _load_or_reload(self, key: Key) -> None:
        """RepositoryModelLoad: a version workers hold READY is read from disk again on
        each of them (Triton's reload); anywhere else it is loaded."""
        holders = self.pool.holders(key)
        if not holders:
            await self.ensure_loaded(key)
            return
        self._wanted.add(key)
        self._unwanted.discard(key)
        await self._reload(key, holders)

    async def _reload(self, key: Key, holders: list[PooledWorker]) -> None:
        """Each holder warms the new files, then swaps them in (its batches keep running
        meanwhile). Holders whose reload failed drop the version, so that every answer
        comes from the new files; FailedPrecondition when every holder failed (the
        previous files keep serving)."""
        model, version = key
        log.info("reloading %s version %s on %s", model, version,
                 ", ".join(w.address for w in holders))
        results = await asyncio.gather(
            *(w.link.load(model, version, reload=True) for w in holders), return_exceptions=True)
        failed = [(w, r) for w, r in zip(holders, results, strict=True)
                  if isinstance(r, BaseException)]
        for w, e in failed:
            log.warning("reloading %s version %s on %s failed: %s", model, version, w.address, e)
        if not failed:
            return
        if len(failed) == len(holders):
            raise FailedPrecondition(
                f"reloading model '{model}' version {version} failed, its previous files "
                f"keep serving: {failed[0][1]}")
        log.warning("unloading %s version %s from %s: every answer comes from the new files",
                    model, version, ", ".join(w.address for w, _ in failed))
        await asyncio.gather(*(w.link.unload(model, version) for w, _ in failed),
                             return_exceptions=True)

    async def ensure_loaded(self, key: Key) -> None:
        """Marks a version wanted and returns once a worker holds it READY or loading failed."""
        self._wanted.add(key)
        self._unwanted.discard(key)
        self._load_errors.pop(key, None)
        while not self.pool.holders(key):
            if not self.pool.loading(key):
                if not self.pool.connected():
                    self._load_errors[key] = (self.now(), "no model worker is connected")
                    return
                task = self._start_load(key)
            else:
                task = self._loads.get(key)
            if task is not None:
                await asyncio.shield(task)
                if key in self._load_errors:
                    return
            else:
                await self.pool.wait_change(1.0)

    async def unload_model(self, model: str, versions: list[str]) -> list[VersionState]:
        known = self._known_versions(model)
        versions = [str(int(v)) if v.isdigit() else v for v in versions] or known
        for v in versions:
            if v not in known:
                raise NotFound(f"model '{model}' has no version {v!r}")
        for v in versions:
            key = (model, v)
            self._wanted.discard(key)
            self._unwanted.add(key)
            task = self._loads.pop(key, None)
            if task is not None:
                task.cancel()
            holders = [w for w in self.pool.connected() if w.state_of(key) is not None]
            results = await asyncio.gather(
                *(w.link.unload(model, v) for w in holders), return_exceptions=True)
            for w, res in zip(holders, results, strict=True):
                w.loading.discard(key)
                if isinstance(res, BaseException) and not isinstance(res, NotFound):
                    log.warning("unloading %s version %s from %s: %s", model, v, w.address, res)
        # Wait (bounded) for the workers' reports to drop it.
        limit = self.now() + 5.0
        while self.now() < limit and any(
            w.state_of((model, v)) for w in self.pool.connected() for v in versions
        ):
            await self.pool.wait_change(0.5)
        return [s for s in self.model_states(model) if s.version in versions]

    def _known_versions(self, model: str) -> list[str]:
        """Versions on disk and held by a worker (only those held when the config is broken:
        one broken model must not break every other model's states)."""
        try:
            on_disk = {str(v) for v in self.repository.versions(model)}
        except ConfigError:
            on_disk = set()
        held = {
            m.version for w in self.pool.connected() if w.report
            for m in w.report.models if m.model == model
        }
        return sorted(on_disk | held, key=lambda v: (len(v), v))

    def model_states(self, model: str = "") -> list[VersionState]:
        names = [model] if model else self.repository.names()
        out = []
        for name in names:
            for v in self._known_versions(name):
                out.append(self.version_state((name, v)))
        return out

    def version_state(self, key: Key) -> VersionState:
        model, version = key
        holders = tuple(sorted(w.address for w in self.pool.holders(key)))
        if holders:
            return self._ready_state(key, holders)
        if self.pool.loading(key) or key in self._loads:
            return VersionState(model, version, "LOADING", "", ())
        if key in self._unwanted:
            reason = "unloaded"
        elif key in self._load_errors:
            reason = f"load failed: {self._load_errors[key][1]}"
        elif not self.pool.connected():
            reason = "no model worker is connected"
        else:
            reason = "not loaded on any model worker"
        return VersionState(model, version, "UNAVAILABLE", reason, ())

    def _ready_state(self, key: Key, holders: tuple[str, ...]) -> VersionState:
        """READY, with the holders' CUDA graph buckets; the reason names the batch sizes a
        worker runs eagerly because their capture failed ("" when none did)."""
        graphs: set[int] = set()
        eager: set[int] = set()
        notes = []
        for w in self.pool.holders(key):
            for m in w.report.models if w.report else ():
                if (m.model, m.version) != key:
                    continue
                graphs.update(m.graph_buckets)
                if m.eager_buckets:
                    eager.update(size for size, _ in m.eager_buckets)
                    sizes = ", ".join(str(size) for size, _ in m.eager_buckets)
                    notes.append(f"{w.address} runs batch sizes {sizes} eagerly "
                                 f"({m.eager_buckets[0][1]})")
        return VersionState(key[0], key[1], "READY", "; ".join(notes), holders,
                            tuple(sorted(graphs)), tuple(sorted(eager)))

    def note_reported(self) -> None:
        """A worker reported its models: versions it holds READY become wanted (so they are
        reloaded elsewhere after an eviction or a worker restart) unless unloaded."""
        for w in self.pool.connected():
            if w.report is None:
                continue
            for m in w.report.models:
                key = (m.model, m.version)
                if m.state == "READY" and key not in self._unwanted:
                    self._wanted.add(key)

    def apply_control(self, model: str, control: Control | None) -> None:
        """The cluster's model control changed (common.model_control): a loaded model's
        versions are wanted (loaded in the background if no worker holds them), an unloaded
        one is never dispatched again and leaves the workers."""
        if control is None:
            self.controls.pop(model, None)
            return
        self.controls[model] = control
        if control.loaded:
            for v in control.versions:
                key = (model, v)
                self._unwanted.discard(key)
                if key not in self._wanted or not self.pool.holders(key):
                    self._spawn(self.ensure_loaded(key))
            return
        try:
            known = self._known_versions(model)
        except MeshError as e:  # e.g. gone from the repository: nothing to dispatch
            log.info("model control: %s unloaded (%s)", model, e)
            return
        for v in known:
            self._wanted.discard((model, v))
            self._unwanted.add((model, v))
        if any(w.state_of((model, v)) for w in self.pool.connected() for v in known):
            self._spawn(self.unload_model(model, []))

    def statistics(self, model: str = "", version: str = "") -> list[ModelStats]:
        if model:
            known = self._known_versions(model)
            if version and version not in known:
                raise NotFound(f"model '{model}' has no version {version!r}")
            for v in [version] if version else known:
                self.stats.ensure(model, v)
        return self.stats.snapshot(model, version)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher task failed", exc_info=task.exception())

    async def close(self) -> None:
        for mq in self._queues.values():
            mq.queue.fail_all(Unavailable("the batcher is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _trace(r: Request, result: InferResult, code: str, total_ns: int) -> None:
    """The request's log line (sampled, or an error) and its queue-wait span."""
    ctx = tracing.parse(r.traceparent)
    tracing.log_request(
        log, ctx, "batcher answered request %d for %s version %s: %s, queued %.2f ms, "
        "batch of %d rows, compute %.2f ms%s", r.request_id, r.model, r.version, code,
        result.queue_ns / 1e6, result.batch_size, result.compute_ns / 1e6,
        f" ({result.error})" if result.error is not None else "", error=result.error is not None)
    now_ns = time.time_ns()
    start_ns = now_ns - total_ns
    tracing.record_span("batcher queue", ctx, start_ns, start_ns + result.queue_ns,
                        error=str(result.error or ""), model=r.model, version=r.version,
                        batch_size=result.batch_size)


def _ordered_inputs(config: ModelConfig, inputs: list[RawTensor]) -> list[RawTensor]:
    """The request's inputs in the model's declared order; every input exactly once."""
    by_name = {t.name: t for t in inputs}
    expected = [s.name for s in config.inputs]
    if len(by_name) != len(inputs) or set(by_name) != set(expected):
        raise InvalidInput(
            f"model '{config.name}' takes inputs {expected}, got {[t.name for t in inputs]}"
        )
    return [by_name[n] for n in expected]


class Session:
    """One Infer stream: requests multiplexed by id, and an outbox of ready results that
    the writer drains whole into one message."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.pending: dict[int, Request] = {}
        self._outbox: list[InferResult] = []
        self._ready = asyncio.Event()
        self._input_ended = False
        self._received = 0  # messages read and not yet acknowledged (flow control)
        # The caller reads ResultBlocks (InferRequests.result_blocks).
        self.blocks = False

    def submit(self, request_id: int, model: str, version: str, inputs: list[RawTensor],
               outputs: list[str], priority: int, timeout_us: int, traceparent: str = "") -> None:
        try:
            request = self.batcher.submit(request_id, model, version, inputs, outputs,
                                          priority, timeout_us, traceparent)
        except MeshError as e:
            self.batcher.record_rejected(model, version, e)
            tracing.log_request(log, tracing.parse(traceparent),
                                "batcher refused request %d for %s version %s: %s",
                                request_id, model, version, e, error=True)
            self._post(InferResult(request_id, e))
            return
        self.pending[request_id] = request
        request.on_result = self._done

    def fail(self, request_id: int, error: MeshError) -> None:
        """A request that could not even be read (bad tensor): answered at once."""
        self._post(InferResult(request_id, error))

    def cancel(self, request_id: int, withdrawn: bool = False) -> None:
        request = self.pending.get(request_id)
        if request is not None:
            request.withdrawn = withdrawn
            self.batcher.cancel(request)

    def _done(self, request: Request, result: InferResult) -> None:
        self.pending.pop(request.request_id, None)
        self._post(result)

    def _post(self, result: InferResult) -> None:
        self._outbox.append(result)
        self._ready.set()

    def received(self) -> None:
        """One message of the caller was read: acknowledged with the next drain."""
        self._received += 1
        self._ready.set()

    async def drain(self) -> tuple[list[InferResult], int] | None:
        """Every ready result and the count of messages read since the last drain (waits
        for at least one of either); None once the caller has half-closed and every
        request is answered."""
        while not self._outbox and not self._received:
            if self._input_ended and not self.pending:
                return None
            self._ready.clear()
            await self._ready.wait()
        out, self._outbox = self._outbox, []
        received, self._received = self._received, 0
        return out, received

    def end_input(self) -> None:
        """The caller sent its last message; answer what is pending, then end."""
        self._input_ended = True
        self._ready.set()

    def close(self) -> None:
        """The stream ended: cancel whatever is still queued or running."""
        for request in list(self.pending.values()):
            self.batcher.cancel(request)
