"""Loaded models and the LRU model cache of one device. Imports neither grpc nor protobuf.

The cache is bounded by count (--max-models) and by bytes (--max-memory-mb; a model's
size is measured once loaded and warmed, so the byte bound is checked then). A load that
would exceed a bound evicts the least recently used idle model (no batch in flight); when
none can go, the load fails with Overloaded naming what holds the memory. Concurrent
loads of one version share a single load. Unload waits for the model's in-flight batches
(new batches are refused as soon as the unload starts). Reload reads a loaded version's
files again, warms them up, then swaps them in at once: batches already running finish
on the previous files, the next batch runs on the new ones.

All methods run on the event loop; loading runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshserve.common.datatypes import datatype, from_torch
from meshserve.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidInput,
    MeshError,
    NotFound,
    Overloaded,
)
from meshserve.common.repository import ModelConfig, ModelRepository
from meshserve.model_worker.compiling import (
    cast_network,
    compile_network,
    compiler_message,
    with_precision,
)
from meshserve.model_worker.cuda_graphs import BucketRunner, InputSpec, zero_inputs
from meshserve.model_worker.loader import Forward, load_network, module_bytes, output_mapper
from meshserve.model_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

LOADING, READY = "LOADING", "READY"
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    version: str
    state: str  # READY or LOADING
    byte_size: int
    warmup: tuple[tuple[int, int], ...] = ()  # (batch size, ns) per bucket
    cuda_graphs: bool = False
    load_ns: int = 0
    format: str = ""
    precision: str = ""
    compile_mode: str = ""  # "" when the config asks for no torch.compile
    compiled: bool = False  # false with compile_mode set: fell back to eager
    compile_ns: int = 0  # compiling and warming every bucket
    compile_error: str = ""  # the compiler's message when it fell back
    graph_buckets: tuple[int, ...] = ()  # batch sizes replaying a CUDA graph
    eager_buckets: tuple[tuple[int, str], ...] = ()  # (size, why) where capture failed


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model version ready to run on the device."""

    config: ModelConfig
    version: str
    runner: BucketRunner
    byte_size: int
    warmup: tuple[tuple[int, int], ...]
    cuda_graphs: bool
    load_ns: int
    compiled: bool = False
    compile_ns: int = 0
    compile_error: str = ""
    graph_buckets: tuple[int, ...] = ()
    eager_buckets: tuple[tuple[int, str], ...] = ()


def _check_outputs(config: ModelConfig, forward: Forward, specs, device: torch.device) -> None:
    """One run on zeros: the network must return the declared dtypes and dims."""
    batched = config.max_batch_size > 0
    inputs = zero_inputs(specs, 1, device)
    if not batched:
        inputs = [x[0] for x in inputs]
    with torch.inference_mode():
        outputs = forward(*inputs)
    for spec, out in zip(config.model_outputs, outputs, strict=True):
        got = from_torch(out.dtype)
        shape = tuple(out.shape[1:] if batched else out.shape)
        if got != spec.datatype or not spec.matches(shape):
            raise InvalidInput(
                f"model '{config.name}' output '{spec.name}' is {got} {list(shape)}, "
                f"its config declares {spec.datatype} {list(spec.dims)}"
            )


def _probe(config: ModelConfig, forward: Forward, specs, dev: torch.device, where: str) -> None:
    """_check_outputs, with a forward that raises reported as the model's load error."""
    try:
        _check_outputs(config, forward, specs, dev)
    except MeshError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own forward failed
        if config.precision != "fp32":
            raise FailedPrecondition(
                f"{where}: does not run in precision {config.precision} on {dev.type}: "
                f"{compiler_message(e)}"
                + (" (use bf16 or fp32 on cpu)" if config.precision == "fp16"
                   and dev.type == "cpu" else "")
            ) from None
        raise InvalidInput(f"{where}: the model fails on zero inputs: "
                           f"{compiler_message(e)}") from None


# torch.export, dynamo and inductor import their modules lazily, and two threads doing
# that at once fail on partially initialized modules: loads that use them run one at a time.
_COMPILER_STACK = threading.Lock()


def load_model(
    config: ModelConfig, path: Path, version: str, device: str, cuda_graphs: bool
) -> LoadedModel:
    """Loads, casts, compiles and warms one version (blocking: run it in a thread)."""
    if config.format in ("torch_export", "aot_inductor") or config.compile is not None:
        with _COMPILER_STACK:
            return _load_model(config, path, version, device, cuda_graphs)
    return _load_model(config, path, version, device, cuda_graphs)


def _load_model(
    config: ModelConfig, path: Path, version: str, device: str, cuda_graphs: bool
) -> LoadedModel:
    start = time.perf_counter_ns()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    label = f"model '{config.name}' version {version}"
    try:
        module = cast_network(load_network(config, path, dev), config.precision)
    except MeshError as e:
        raise type(e)(f"{label}: {e}") from None
    eager = with_precision(config, output_mapper(config, module))
    specs = [InputSpec(s.name, datatype(s.datatype).torch, s.dims) for s in config.inputs]
    _probe(config, eager, specs, dev, f"{label} ({path})")
    batched = config.max_batch_size > 0
    c = config.compile

    def runner_for(forward: Forward, compiled: bool) -> BucketRunner:
        # torch.compile's modes that capture CUDA graphs win over the worker's own.
        graphs = (cuda and cuda_graphs and config.cuda_graphs and batched
                  and not (compiled and c.captures_cuda_graphs))
        # Compiled models always run padded to a bucket: no new shape while serving.
        return BucketRunner(forward, specs, config.buckets() if batched else (), dev,
                            static_buffers=graphs or compiled, use_graphs=graphs)

    def warm(runner: BucketRunner, compiled: bool) -> list[tuple[int, int]]:
        if batched and (config.warmup.enabled or runner.use_graphs or compiled):
            return runner.warmup()
        if compiled:  # unbatched: compile its one shape now
            _check_outputs(config, runner.forward, specs, dev)
        return []

    if cuda:
        torch.cuda.synchronize(dev)
    # Graph pools stay reserved (not allocated) between replays: count both.
    base = _device_bytes(dev) if cuda else (0, 0)
    compiled, compile_ns, compile_error = False, 0, ""
    if c is not None:
        t0 = time.perf_counter_ns()
        try:
            runner = runner_for(
                with_precision(config, output_mapper(config, compile_network(module, c))), True)
            warmup = warm(runner, True)
            compiled = True
        except Exception as e:  # noqa: BLE001 - any compiler error fails or falls back
            message = compiler_message(e)
            if not c.fallback:
                raise InvalidInput(f"{label} ({path}): torch.compile (mode {c.mode}) "
                                   f"failed: {message}") from None
            log.warning("%s: torch.compile failed, serving eager (fallback): %s", label,
                        message)
            compile_error = message
        compile_ns = time.perf_counter_ns() - t0
        if compiled:
            log.info("%s: compiled (mode %s, dynamic %s) and warmed %d buckets in %.1f s",
                     label, c.mode, c.dynamic, len(warmup), compile_ns / 1e9)
    if not compiled:
        runner = runner_for(eager, False)
        warmup = warm(runner, False)
    extra = 0
    if cuda:
        torch.cuda.synchronize(dev)
        extra = max(0, *(after - before for after, before in zip(_device_bytes(dev), base,
                                                                  strict=True)))
    eager_buckets = tuple(runner.eager_buckets.items())
    if eager_buckets:
        log.warning("%s: CUDA graphs for batch sizes %s, eager for %s", label,
                    list(runner.graph_buckets), [s for s, _ in eager_buckets])
    return LoadedModel(
        config=config, version=version, runner=runner,
        byte_size=module_bytes(module) + extra, warmup=tuple(warmup),
        cuda_graphs=bool(runner.graph_buckets), load_ns=time.perf_counter_ns() - start,
        compiled=compiled, compile_ns=compile_ns, compile_error=compile_error,
        graph_buckets=runner.graph_buckets, eager_buckets=eager_buckets,
    )


def _device_bytes(dev: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes on a CUDA device; a graph's private pool is reserved."""
    return torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)


Loader = Callable[[ModelConfig, Path, str, str, bool], LoadedModel]


@dataclass(slots=True)
class _Entry:
    name: str
    version: str
    byte_size: int  # 0 while loading, then the measured size
    model: LoadedModel | None = None
    in_flight: int = 0
    # Batches in flight per model object (by id): after a reload swapped `model`, batches
    # of the previous one still finish and release it.
    running: dict[int, int] = field(default_factory=dict)
    unloading: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def info(self) -> ModelInfo:
        m = self.model
        if m is None:
            return ModelInfo(self.name, self.version, LOADING, self.byte_size)
        c = m.config
        return ModelInfo(
            self.name, self.version, READY, self.byte_size, m.warmup, m.cuda_graphs, m.load_ns,
            format=c.format, precision=c.precision, compile_mode=c.compile.mode if c.compile
            else "", compiled=m.compiled, compile_ns=m.compile_ns, compile_error=m.compile_error,
            graph_buckets=m.graph_buckets, eager_buckets=m.eager_buckets,
        )


def normalize_version(name: str, version: str) -> str:
    v = str(version).strip()
    if not v.isdigit() or int(v) < 1:
        raise NotFound(f"model '{name}' has no version {version!r}")
    return str(int(v))


class ModelCache:
    def __init__(
        self,
        repository: ModelRepository,
        device: str,
        *,
        max_models: int,
        max_memory_bytes: int = 0,
        cuda_graphs: bool = True,
        loader: Loader = load_model,
        on_change: Callable[[], None] = lambda: None,
        metrics: WorkerMetrics | None = None,
    ):
        if max_models < 1 or max_memory_bytes < 0:
            raise ValueError("max_models must be >= 1 and max_memory_bytes >= 0")
        self.repository = repository
        self.device = device
        self.max_models = max_models
        self.max_memory_bytes = max_memory_bytes
        self.cuda_graphs = cuda_graphs
        self._loader = loader
        self._on_change = on_change
        self._metrics = metrics
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # LRU first
        self._loads: dict[tuple[str, str], asyncio.Task] = {}
        self._reloads: dict[tuple[str, str], asyncio.Task] = {}
        self._default_versions: dict[str, str] = {}

    # --------------------------------------------------------------------------- status

    @property
    def memory_used_bytes(self) -> int:
        return sum(e.byte_size for e in self._entries.values())

    def models(self) -> tuple[ModelInfo, ...]:
        return tuple(e.info() for e in self._entries.values())

    def ready_count(self) -> int:
        return sum(1 for e in self._entries.values() if e.model is not None)

    # -------------------------------------------------------------------------- loading

    async def load(self, name: str, version: str = "") -> ModelInfo:
        """Loads and warms a version ('' = the model's default version); a no-op when it
        is loaded already. Returns once it is READY."""
        if not version:
            version = self.repository.default_version(name)
        key = (name, normalize_version(name, version))
        entry = self._entries.get(key)
        if entry is not None and entry.model is not None and not entry.unloading:
            self._entries.move_to_end(key)
            return entry.info()
        task = self._loads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(*key))
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        return await asyncio.shield(task)

    async def reload(self, name: str, version: str = "") -> ModelInfo:
        """Loads a loaded version's files again and swaps them in once warmed up (loads it
        when it is not loaded). Until the swap, and if the new files fail, the previous
        ones keep serving. Concurrent reloads of one version share one."""
        if not version:
            version = self.repository.default_version(name)
        key = (name, normalize_version(name, version))
        entry = self._entries.get(key)
        if entry is None or entry.model is None or entry.unloading:
            return await self.load(*key)
        task = self._reloads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._reload(entry))
            self._reloads[key] = task
            task.add_done_callback(lambda _: self._reloads.pop(key, None))
        return await asyncio.shield(task)

    async def _reload(self, entry: _Entry) -> ModelInfo:
        key = (entry.name, entry.version)
        config, path = self._files(*key)
        model = await asyncio.to_thread(
            self._loader, config, path, entry.version, self.device, self.cuda_graphs
        )
        if self._entries.get(key) is not entry or entry.unloading:
            raise NotFound(f"model {entry.label} was unloaded while it reloaded")
        previous = entry.byte_size
        entry.byte_size = model.byte_size
        try:
            self._make_room(entry)
        except BaseException:
            entry.byte_size = previous
            raise
        entry.model = model  # one step on the event loop: the next acquire gets it
        self._default_versions[entry.name] = self.repository.default_version(entry.name)
        log.info("reloaded %s (%.1f MiB, %.0f ms, buckets %s)", entry.label,
                 entry.byte_size / MiB, model.load_ns / 1e6, [b for b, _ in model.warmup])
        if self._metrics is not None:
            self._metrics.loaded(entry.name, entry.version, model.load_ns)
        self._on_change()
        return entry.info()

    def _files(self, name: str, version: str) -> tuple[ModelConfig, Path]:
        try:
            return self.repository.config(name), self.repository.model_file(name, version)
        except ConfigError as e:
            raise InvalidInput(str(e)) from None

    async def _load(self, name: str, version: str) -> ModelInfo:
        config, path = self._files(name, version)
        # Being unloaded: wait until it is gone (its unload runs once it is idle).
        while (old := self._entries.get((name, version))) is not None:
            await old.idle.wait()
            await asyncio.sleep(0)
        # The byte size is known once loaded (on CUDA it includes the graphs): the count
        # bound is enforced now, the byte bound right after loading.
        entry = _Entry(name, version, 0)
        self._make_room(entry)
        self._entries[(name, version)] = entry
        entry.idle.set()
        self._on_change()
        try:
            model = await asyncio.to_thread(
                self._loader, config, path, version, self.device, self.cuda_graphs
            )
            entry.byte_size = model.byte_size
            self._make_room(entry)
        except BaseException:
            self._remove(entry)
            raise
        entry.model = model
        self._entries.move_to_end((name, version))
        self._default_versions[name] = self.repository.default_version(name)
        log.info("loaded %s (%.1f MiB, %.0f ms, buckets %s)", entry.label,
                 entry.byte_size / MiB, model.load_ns / 1e6, [b for b, _ in model.warmup])
        if self._metrics is not None:
            self._metrics.loaded(name, version, model.load_ns)
        self._on_change()
        return entry.info()

    def _make_room(self, entry: _Entry) -> None:
        """Evicts idle models (LRU first) until `entry` fits; Overloaded if it cannot."""
        key = (entry.name, entry.version)

        def others():
            return [e for k, e in self._entries.items() if k != key]

        def too_many() -> bool:
            return len(others()) + 1 > self.max_models

        def too_big() -> bool:
            limit = self.max_memory_bytes
            return bool(limit) and sum(e.byte_size for e in others()) + entry.byte_size > limit

        if self.max_memory_bytes and entry.byte_size > self.max_memory_bytes:
            raise Overloaded(
                f"{entry.label} needs {entry.byte_size / MiB:.1f} MiB, more than the worker's "
                f"whole --max-memory-mb {self.max_memory_bytes / MiB:.1f} MiB"
            )
        while too_many() or too_big():
            victim = next(
                (e for e in others()
                 if e.model is not None and e.in_flight == 0 and not e.unloading),
                None,
            )
            if victim is None:
                holders = ", ".join(
                    f"{e.label} ({e.byte_size / MiB:.1f} MiB, "
                    f"{'loading' if e.model is None else f'{e.in_flight} batches in flight'})"
                    for e in others()
                ) or "nothing"
                bound = (f"--max-models {self.max_models}" if too_many()
                         else f"--max-memory-mb {self.max_memory_bytes / MiB:.1f}")
                raise Overloaded(
                    f"cannot load {entry.label} ({entry.byte_size / MiB:.1f} MiB) within "
                    f"{bound}: no idle model to evict; held by {holders}"
                )
            log.info("evicting %s (least recently used) to load %s", victim.label, entry.label)
            self._remove(victim)

    def _remove(self, entry: _Entry) -> None:
        if self._entries.get((entry.name, entry.version)) is entry:
            del self._entries[(entry.name, entry.version)]
            entry.model = None
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self._on_change()

    async def unload(self, name: str, version: str = "") -> None:
        """Waits for the version's in-flight batches, then drops it."""
        if not version:
            version = self._default_versions.get(name, "")
        key = (name, normalize_version(name, version))
        task = self._loads.get(key)
        if task is not None:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        entry = self._entries.get(key)
        if entry is None or entry.unloading:
            raise NotFound(f"model {name} version {key[1]} is not loaded")
        entry.unloading = True
        await entry.idle.wait()
        self._remove(entry)
        log.info("unloaded %s", entry.label)

    def close(self) -> None:
        for entry in list(self._entries.values()):
            self._remove(entry)

    # ------------------------------------------------------------------------- batches

    def acquire(self, name: str, version: str, worker_id: str) -> LoadedModel:
        """The loaded version for one batch (counts it in flight, marks it recently used);
        NotFound when it is not loaded. Pair with release()."""
        if not version:
            version = self._default_versions.get(name, "0")
        v = version.strip()
        key = (name, str(int(v)) if v.isdigit() else v)
        entry = self._entries.get(key)
        if entry is None or entry.model is None or entry.unloading:
            why = "" if entry is None else (" (still loading)" if entry.model is None
                                             else " (unloading)")
            raise NotFound(f"model {name} version {version} is not loaded on worker "
                           f"{worker_id}{why}")
        model = entry.model
        entry.in_flight += 1
        entry.running[id(model)] = entry.running.get(id(model), 0) + 1
        entry.idle.clear()
        self._entries.move_to_end(key)
        return model

    def release(self, model: LoadedModel) -> None:
        entry = self._entries.get((model.config.name, model.version))
        count = None if entry is None else entry.running.get(id(model))
        if count is None:  # not (or no longer) this entry's: unloaded meanwhile
            return
        if count > 1:
            entry.running[id(model)] = count - 1
        else:
            del entry.running[id(model)]
        entry.in_flight -= 1
        if entry.in_flight == 0:
            entry.idle.set()
