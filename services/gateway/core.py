"""The gateway's work behind the public API: resolve the model version, consult the cache,
hand misses to the batcher, store results, and manage models. No grpc server code here:
the servicer translates protobuf to these calls and back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.cache import keys
from meshserve.common.errors import (
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    MeshError,
    NotFound,
    Unavailable,
)
from meshserve.common.logs import clip
from meshserve.common.model_control import Control
from meshserve.common.repository import ModelConfig, ModelRepository, check_model_name
from meshserve.common.validation import (
    RequestedOutput,
    WireTensor,
    resolve_outputs,
    validate_inputs,
)
from meshserve.gateway.l1 import L1Cache
from meshserve.gateway.routing import LoadTracker
from meshserve.pb.meshserve.v1 import batcher_pb2, cache_pb2

log = logging.getLogger(__name__)

CATALOG_TTL_S = 5.0
# Input signatures whose validation is remembered (clients choose shapes: bounded).
MAX_VALIDATED_SIGNATURES = 4096
# A miss is sent to the batcher while the cache service answers (the hit withdraws it)
# while fewer than this share of the service's recent answers are hits.
SPECULATE_BELOW_HIT_RATE = 0.5
HIT_RATE_ALPHA = 0.05
# How long the L1 keeps an entry of a model whose cache config sets no TTL.
L1_DEFAULT_TTL_S = 60


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen init costs 3x
class InferCall:
    model: str
    version: str  # "" = the model's default version
    inputs: Sequence[WireTensor]
    outputs: Sequence[RequestedOutput]
    priority: int = 0
    timeout_s: float | None = None  # the shorter of the gRPC deadline and the `timeout` parameter
    use_cache: bool = True
    route_key: str = ""  # sticky routing: metadata x-route-key, else the request id


@dataclass(frozen=True, slots=True)
class InferOutcome:
    version: str
    outputs: Sequence  # records with name, datatype, shape, data (meshserve.v1 Tensor alike)
    cache_hit: bool
    queue_ns: int = 0
    compute_ns: int = 0
    model: str = ""  # the model that served it (a fallback may be another model)


@dataclass(frozen=True, slots=True)
class _Entry:
    config: ModelConfig | None  # None: the config is broken (error says why)
    on_disk: tuple[str, ...] = ()  # version folders holding the model file
    versions: tuple[str, ...] = ()  # served: the version policy's choice of on_disk
    error: MeshError | None = None
    problem: str = ""  # no version folder holds the model file: which file, what is there


@dataclass(slots=True)
class CacheCounts:
    hit_requests: int = 0
    hit_rows: int = 0
    hit_ns: int = 0
    miss_requests: int = 0
    miss_ns: int = 0

    hit_rate: float = 0.0  # of the cache service's answers, recent (EWMA)

    def hit(self, rows: int, ns: int) -> None:
        self.hit_requests += 1
        self.hit_rows += rows
        self.hit_ns += ns

    def observe_lookup(self, hit: bool) -> None:
        self.hit_rate += HIT_RATE_ALPHA * (hit - self.hit_rate)


def _cached(value: bytes, output_names: list[str], version: str, model: str
            ) -> InferOutcome | None:
    """The outcome a cached entry answers, None when it lacks a requested output."""
    cached = {t.name: t for t in cache_pb2.CachedOutputs.FromString(value).outputs}
    if not all(name in cached for name in output_names):
        return None
    return InferOutcome(version, [cached[n] for n in output_names], cache_hit=True, model=model)


def _cached_value(outputs) -> bytes:
    """A cache entry of outputs (records with name, datatype, shape, data)."""
    cached = cache_pb2.CachedOutputs()
    add = cached.outputs.add
    for t in outputs:
        add(name=t.name, datatype=t.datatype, shape=t.shape, data=t.data)
    return cached.SerializeToString()


class Catalog:
    """Every model's config and versions, read from the repository on construction, on
    every load or unload, and in the background (a worker thread) once a request finds the
    snapshot older than ttl_s: a request never touches the disk. A model with a broken
    config stays listed with its error, which requests for it answer."""

    def __init__(self, repository: ModelRepository, ttl_s: float = CATALOG_TTL_S):
        self.repository = repository
        self.ttl_s = ttl_s
        self.default_overrides: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._read_at = 0.0
        self._reading: asyncio.Future | None = None
        self.reload()

    def _read(self, model: str) -> _Entry:
        try:
            config = self.repository.config(model)
            on_disk = self.repository.versions(model, config)
        except ConfigError as e:
            return _Entry(None, error=e)
        served = config.version_policy.select(on_disk)
        problem = "" if on_disk else self.repository.missing_file(model, "", config)
        return _Entry(config, tuple(str(v) for v in on_disk), tuple(str(v) for v in served),
                      problem=problem)

    def reload(self) -> None:
        """Reads every model (blocking: at start, or in a worker thread)."""
        read_at = time.monotonic()
        entries = {}
        for name in self.repository.names():
            try:
                entries[name] = self._read(name)
            except NotFound:  # removed while we read
                continue
        self._entries = entries
        self._read_at = read_at

    def refresh(self, model: str) -> None:
        """Reads one model again (blocking: load and unload run it in a worker thread)."""
        check_model_name(model)
        try:
            self._entries[model] = self._read(model)
        except NotFound:
            self._entries.pop(model, None)

    async def reload_now(self) -> None:
        await asyncio.to_thread(self.reload)

    def _reload_in_background(self) -> None:
        if self._reading is not None or time.monotonic() - self._read_at <= self.ttl_s:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reading = loop.run_in_executor(None, self.reload)
        self._reading.add_done_callback(self._read_done)

    def _read_done(self, future: asyncio.Future) -> None:
        self._reading = None
        if not future.cancelled() and future.exception() is not None:
            self._read_at = time.monotonic()  # retried after ttl_s, not on every request
            log.warning("reading the model repository failed: %s", future.exception())

    def known(self, model: str) -> bool:
        return model in self._entries

    def entries(self) -> dict[str, _Entry]:
        return self._entries

    def get(self, model: str) -> _Entry:
        """The model's entry; NotFound for a model not in the repository, and the config's
        error (FAILED_PRECONDITION, naming file and field) for a broken one."""
        entry = self._entries.get(model)
        self._reload_in_background()
        if entry is None:
            check_model_name(model)
            raise NotFound(f"unknown model '{model}'")
        if entry.error is not None:
            raise entry.error
        return entry

    def default_version(self, model: str, entry: _Entry) -> str:
        return self.default_overrides.get(model) or entry.config.default_version or (
            entry.versions[-1] if entry.versions else "")

    def resolve(self, model: str, version: str) -> tuple[ModelConfig, str]:
        entry = self.get(model)
        if not version:
            version = self.default_version(model, entry)
            if not version:
                raise NotFound(f"model '{model}' has no version to serve")
        if version not in entry.versions:
            served = ", ".join(entry.versions) or "none"
            raise NotFound(f"model '{model}' has no version '{version}' (served: {served})")
        return entry.config, version


class Gateway:
    def __init__(self, repository: ModelRepository, batcher, cache=None,
                 cache_timeout_s: float = 0.05, control=None, l1: L1Cache | None = None,
                 routing=None):
        """control: where the cluster's model control lives (common.control_store; None:
        this gateway's memory only). l1: an in-process cache in front of `cache`.
        routing: builds the router that applies routing policies from this gateway's
        catalog, loads and direct path (gateway.traffic.Router; None: no policies)."""
        self.repository = repository
        self.control = control
        self.controls: dict[str, Control] = {}  # the cluster's, as last seen
        self.catalog = Catalog(repository)
        self.batcher = batcher
        self.cache = cache
        # In front of the cache: told of every invalidation, unused while it could miss one.
        self.l1 = l1 if cache is not None else None
        if self.l1 is not None:
            cache.on_invalidated = self.l1.invalidate
            cache.on_availability = self.l1.set_usable
            self.l1.set_usable(cache.available())
        self.cache_timeout_s = cache_timeout_s
        self.cache_counts: dict[tuple[str, str], CacheCounts] = defaultdict(CacheCounts)
        self.loads = LoadTracker()  # EWMA queue/latency per version, from batcher results
        self._validated: dict[tuple, tuple[ModelConfig, int]] = {}
        self.router = routing(self) if routing is not None else None

    # ------------------------------------------------------------------ inference

    async def infer(self, call: InferCall) -> InferOutcome:
        """Through the model's routing policy if it has one (an explicit version bypasses it)."""
        if self.router is not None and not call.version:
            policy = self.router.policies.get(call.model)
            if policy is not None:
                return await self.router.infer(call, policy)
        return await self.infer_direct(call)

    def target_name(self, model: str) -> str:
        """An alias's current target model (for metadata calls); any other name unchanged."""
        return self.router.alias_target(model) if self.router is not None else model

    def check(self, call: InferCall) -> tuple[ModelConfig, str, int, list[str]]:
        """Everything a call can be refused for before it runs: (config, resolved version,
        rows, output names). NotFound for an unknown model or version, else InvalidInput."""
        config, version = self.catalog.resolve(call.model, call.version)
        rows = self._validate(config, call.inputs)
        output_names = resolve_outputs(config, call.outputs)
        if call.priority < 0 or call.priority > config.batching.priority_levels:
            raise InvalidInput(
                f"priority {call.priority} is out of range for model '{config.name}' "
                f"(1 is highest, {config.batching.priority_levels} lowest, 0 the default)"
            )
        return config, version, rows, output_names

    def _validate(self, config: ModelConfig, inputs) -> int:
        """validate_inputs, remembered per config and input signature (names, datatypes,
        shapes, byte sizes: all it reads), so a model's usual request is checked once."""
        signature = (id(config),
                     *((t.name, t.datatype, tuple(t.shape), len(t.data)) for t in inputs))
        known = self._validated.get(signature)
        if known is not None and known[0] is config:  # the config it was checked against
            return known[1]
        rows = validate_inputs(config, inputs)
        if len(self._validated) >= MAX_VALIDATED_SIGNATURES:
            self._validated.clear()
        self._validated[signature] = (config, rows)
        return rows

    async def infer_direct(self, call: InferCall) -> InferOutcome:
        config, version, rows, output_names = self.check(call)
        if call.timeout_s is not None and call.timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the gateway")

        cache_key = None
        generation = 0
        l1, epoch = self.l1, None
        sent = None  # the batcher request sent while the cache answers
        if self.cache is not None and config.cache.enabled and call.use_cache:
            started = time.perf_counter_ns()
            out_params = {o.name: dict(o.parameters) for o in call.outputs}
            digest = keys.request_digest(
                config.name, version,
                [(t.name, t.datatype, t.shape, t.data) for t in call.inputs],
                [(name, out_params.get(name, {})) for name in output_names],
                config.cache.hash_precision,
            )
            counts = self.cache_counts[(config.name, version)]
            if l1 is not None:
                value = l1.get(digest)
                if value is not None:
                    outcome = _cached(value, output_names, version, config.name)
                    if outcome is not None:
                        counts.hit(rows, time.perf_counter_ns() - started)
                        return outcome
                epoch = l1.epoch(config.name)
            cache_key = cache_pb2.CacheKey(model=config.name, version=version, digest=digest)
            # While the service's answers are mostly misses, the request goes to the batcher
            # at once instead of after the answer (one hop less of latency); a hit then
            # withdraws it.
            if counts.hit_rate < SPECULATE_BELOW_HIT_RATE:
                sent = self.batcher.send(config.name, version, call.inputs, output_names,
                                         call.priority, call.timeout_s)
            try:
                result = await self.cache.lookup_one(cache_key)
            except BaseException:
                if sent is not None:
                    self.batcher.cancel(sent)
                raise
            elapsed = time.perf_counter_ns() - started
            generation = result.generation
            counts.observe_lookup(result.hit)
            if result.hit:
                # Entries are shared by requests naming the same outputs in any order.
                outcome = _cached(result.value, output_names, version, config.name)
                if outcome is not None:
                    if sent is not None:
                        self.batcher.cancel(sent)
                    counts.hit(rows, elapsed)
                    self._keep(digest, config, version, result.value, epoch, generation)
                    return outcome
            counts.miss_requests += 1
            counts.miss_ns += elapsed

        if sent is not None:
            result = await self.batcher.result(sent)
        else:
            result = await self.batcher.infer(config.name, version, call.inputs,
                                              output_names, call.priority, call.timeout_s)
        by_name = {t.name: t for t in result.outputs}
        try:
            outputs = [by_name[name] for name in output_names]
        except KeyError as e:
            raise Unavailable(f"the batcher returned no output {e} for '{config.name}'") from None
        if cache_key is not None:
            value = _cached_value(outputs)
            self.cache.store_one(cache_pb2.StoreEntry(
                key=cache_key, value=value, generation=generation, ttl_s=config.cache.ttl_s))
            self._keep(cache_key.digest, config, version, value, epoch, generation)
        self.loads.observe(config.name, version, result.queue_ns, result.compute_ns)
        return InferOutcome(version, outputs, False, result.queue_ns, result.compute_ns,
                            model=config.name)

    def _keep(self, digest: bytes, config: ModelConfig, version: str, value, epoch,
              generation: int) -> None:
        """A result into the L1, only under a generation the cache service gave (a lookup
        that failed has none) and the model's epoch at lookup (None: no L1 in use)."""
        if epoch is not None and generation:
            self.l1.put(digest, config.name, version, value,
                        config.cache.ttl_s or L1_DEFAULT_TTL_S, epoch)

    # ----------------------------------------------------------------- management

    def versions(self, model: str) -> list[str]:
        return list(self.catalog.get(model).versions)

    def metric_label(self, model: str) -> str:
        """A metric label from a bounded set: a repository model or a routing policy's
        name, else "_unknown" (a client must not mint series with names it makes up)."""
        if self.catalog.known(model) or (
                self.router is not None and model in self.router.policies):
            return model
        return "_unknown"

    async def states(self, model: str = "") -> list[batcher_pb2.ModelVersionState]:
        response = await self.batcher.model_states(model)
        return list(response.versions)

    async def graph_buckets(self, model: str, version: str
                            ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(CUDA graph batch sizes, eager batch sizes) of a READY version as its workers
        report them; None when none holds it or the batcher does not answer."""
        try:
            states = await self.states(model)
        except MeshError:
            return None
        for s in states:
            if s.version == version and s.state == "READY":
                return tuple(s.graph_buckets), tuple(s.eager_buckets)
        return None

    async def model_ready(self, model: str, version: str) -> bool:
        _config, version = self.catalog.resolve(model, version)
        for state in await self.states(model):
            if state.model == model and state.version == version:
                return state.state == "READY"
        return False

    async def server_ready(self) -> bool:
        try:
            await self.batcher.model_states("")
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return False
        return True

    async def index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) for every version of every model on disk; a
        model whose config is broken, or without any version holding its model file, is
        one UNAVAILABLE row giving the reason."""
        await self.catalog.reload_now()
        states = {(s.model, s.version): s for s in await self.states("")}
        rows = []
        for name, entry in sorted(self.catalog.entries().items()):
            if entry.error is not None or entry.problem:
                if not ready_only:
                    rows.append((name, "", "UNAVAILABLE", entry.problem or str(entry.error)))
                continue
            for version in entry.on_disk:
                s = states.get((name, version))
                state, reason = (s.state, s.reason) if s else ("UNAVAILABLE", "unloaded")
                if not ready_only or state == "READY":
                    rows.append((name, version, state, reason))
        return rows

    def apply_control(self, model: str, control: Control | None) -> None:
        """The cluster's model control of `model` changed (any gateway's load or unload)."""
        if control is None:
            self.controls.pop(model, None)
        else:
            self.controls[model] = control
        default = control.default_version if control is not None and control.loaded else ""
        if default:
            self.catalog.default_overrides[model] = default
        else:
            self.catalog.default_overrides.pop(model, None)

    async def _put_control(self, control: Control) -> None:
        if self.control is not None:
            await self.control.put(control)
        self.apply_control(control.model, control)

    async def load(self, model: str, versions: list[str], default_version: str | None) -> None:
        """Loads from the repository as it is now (the catalog is read again first), and
        answers once the versions are READY for every batcher. The cluster's model control
        records them (and the default) first, so that every replica converges.
        A broken config answers its error (file and field); a version folder without the
        model file answers which file it needs and what it holds."""
        check_model_name(model)
        await asyncio.to_thread(self.catalog.refresh, model)
        entry = self.catalog.get(model)
        missing = [v for v in versions if v not in entry.on_disk]
        if missing:
            await asyncio.to_thread(self._refuse_missing, model, missing)
        if not versions and not entry.versions:
            if entry.on_disk:
                raise FailedPrecondition(
                    f"model '{model}': its version_policy selects none of the versions on "
                    f"disk ({', '.join(entry.on_disk)})")
            raise FailedPrecondition(f"model '{model}' has no version to load: {entry.problem}")
        wanted = versions or list(entry.versions)
        if default_version is not None and default_version not in wanted:
            raise InvalidInput(
                f"default_version {default_version} is not among the loaded versions "
                f"{', '.join(wanted)}"
            )
        previous = self.controls.get(model) or Control(model, False)
        kept = previous.versions if previous.loaded else ()
        all_versions = tuple(sorted(set(kept) | set(wanted), key=int))
        old_default = previous.default_version if previous.loaded else ""
        if old_default not in all_versions:
            old_default = ""
        control = previous.then(True, all_versions,
                                old_default if default_version is None else default_version)
        await self._put_control(control)
        try:
            response = await self.batcher.load_model(model, versions)
        except MeshError:
            # A reload that failed for one version may have swapped in another's new files.
            await self._invalidate(model, versions)
            if control.default_version != old_default:  # the new default is not served
                await self._put_control(control.then(True, all_versions, old_default))
            raise
        failed = [s for s in response.versions if s.state != "READY"]
        # Once every swap is done: a reload must never serve results of the previous files.
        await self._invalidate(model, [s.version for s in response.versions])
        if failed:
            if control.default_version != old_default:  # the new default is not served
                await self._put_control(control.then(True, all_versions, old_default))
            detail = "; ".join(f"version {s.version}: {s.reason or s.state}" for s in failed)
            raise FailedPrecondition(f"failed to load model '{model}': {detail}")

    def _refuse_missing(self, model: str, versions: list[str]) -> None:
        """Versions without the model file: FailedPrecondition naming the file expected
        and the files found when the folder exists, else NotFound."""
        folders = [v for v in versions if (self.repository.root / model / v).is_dir()]
        if folders:
            raise FailedPrecondition(f"model '{model}' cannot load version {folders[0]}: "
                                     + self.repository.missing_file(model, folders[0]))
        raise NotFound(f"model '{model}' has no version(s) {', '.join(versions)} on disk")

    async def unload(self, model: str) -> None:
        """Answers once no batcher will dispatch the model: recorded in the cluster's model
        control first (batchers that are down learn it when they are back), then every
        reachable batcher refuses it and unloads it from the workers."""
        check_model_name(model)
        await asyncio.to_thread(self.catalog.refresh, model)
        if not self.catalog.known(model):
            raise NotFound(f"unknown model '{model}'")
        previous = self.controls.get(model) or Control(model, False)
        await self._put_control(previous.then(False, (), ""))
        await self.batcher.unload_model(model, [])
        await self._invalidate(model, [])

    async def _invalidate(self, model: str, versions: list[str]) -> None:
        if self.cache is None:
            return
        if self.l1 is not None:  # at once here; the service tells the other gateways
            for version in versions or [""]:
                self.l1.invalidate(model, version)
        try:
            if versions:
                await asyncio.gather(*(self.cache.invalidate(model, v) for v in versions))
            else:
                await self.cache.invalidate(model)
        except Exception as e:  # noqa: BLE001 - generations still protect against staleness
            log.warning("cache invalidation of %s failed: %s", clip(model), clip(e))

    async def statistics(self, model: str, version: str) -> tuple[list[tuple], list[str]]:
        """Per model version: the counts of EVERY batcher summed, and this gateway's cache
        counts; and the addresses of the batchers that answered."""
        if model:
            self.catalog.get(model)
            if version:
                self.catalog.resolve(model, version)
        elif version:
            raise InvalidInput("a version needs a model name")
        response, batchers = await self.batcher.statistics_of_every(model, version)
        out = []
        for s in response.models:
            c = self.cache_counts.get((s.model, s.version), CacheCounts())
            out.append((s, (c.hit_requests, c.hit_rows, c.hit_ns), (c.miss_requests, c.miss_ns)))
        return out, batchers
