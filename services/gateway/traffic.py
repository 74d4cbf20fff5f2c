"""The gateway's router: applies routing policies to requests (weighted, sticky version
choice; shadow mirrors; fallback; cost-aware aliases), holds the policies in force (runtime
ones from the policy store over those of config.json) and counts what it routes.

`Gateway.infer` calls `Router.infer(call, policy)` only for a model with a policy;
every other request costs one dict lookup. The gateway builds its router (its `routing`
argument, e.g. `functools.partial(Router, registry=...)`) and hands it itself as the
router's `Models`: the router sees only that narrow interface."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshserve.common.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidInput,
    MeshError,
    NotFound,
    Overloaded,
    Unavailable,
)
from meshserve.common.logs import clip
from meshserve.common.repository import RoutingConfig
from meshserve.common.tensors import to_numpy
from meshserve.gateway.core import Catalog, InferCall, InferOutcome
from meshserve.gateway.routing import (
    AliasState,
    LoadTracker,
    ModelFacts,
    Policy,
    ShadowGate,
    Target,
    check_stored,
    choose,
    not_found_as_none,
    promote,
    sample_shadows,
    unit,
    validate,
)

log = logging.getLogger(__name__)

# Answers that send a request on to the next fallback target.
FALLBACK_ERRORS = (Unavailable, Overloaded, DeadlineExceeded)


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "meshserve_gateway_route_requests", "Routed requests by model, version, route, code",
            ["model", "version", "route", "code"], registry=registry,
        )
        self.seconds = Histogram(
            "meshserve_gateway_route_seconds", "Routed request latency by model, version, route",
            ["model", "version", "route"], registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.shadow_agreement = Counter(
            "meshserve_gateway_shadow_agreement",
            "Shadow answers equal (agree) or not (disagree) to the primary's, classifiers",
            ["model", "version", "result"], registry=registry,
        )
        self.shadow_dropped = Counter(
            "meshserve_gateway_shadow_dropped", "Shadow requests not sent: too many in flight",
            ["model"], registry=registry,
        )
        self.alias_switches = Counter(
            "meshserve_gateway_alias_switches", "Cost-aware alias target changes",
            ["alias", "target"], registry=registry,
        )


@dataclass(slots=True)
class RouteCount:
    requests: int = 0
    errors: int = 0
    agree: int = 0
    disagree: int = 0


class PolicyStore:
    """Where runtime policies live (Redis, the batcher, or this process): the Router puts
    changes; the store calls back `apply(model, policy or None)` for every change it sees,
    its own included."""

    async def start(self, apply: Callable[[str, Policy | None], None]) -> None:
        self.apply = apply

    async def put(self, policy: Policy) -> None:
        self.apply(policy.model, policy)

    async def delete(self, model: str) -> None:
        self.apply(model, None)

    async def close(self) -> None:
        pass


class Models(Protocol):
    """What the router needs of the gateway (gateway.core.Gateway is one): the catalog,
    the versions' recent loads, and the two ways to serve a call: `infer` (through the
    model's own policy: alias targets) and `infer_direct` (one version, no policy)."""

    catalog: Catalog
    loads: LoadTracker

    def infer(self, call: InferCall) -> Awaitable[InferOutcome]: ...

    def infer_direct(self, call: InferCall) -> Awaitable[InferOutcome]: ...


class Router:
    def __init__(self, models: Models, registry: CollectorRegistry,
                 store: PolicyStore | None = None, draw: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic, protection=None):
        """protection: the gateway's gateway.protection.Protection (None: no limits), which
        charges alias targets, fallbacks and shadows like requests of their own."""
        self.models = models
        self.protection = protection
        self.store = store or PolicyStore()
        self.registry = registry
        self.metrics = RoutingMetrics(registry)
        self.draw, self.clock = draw, clock
        self.policies: dict[str, Policy] = {}  # in force: runtime over config
        self._runtime: dict[str, Policy] = {}
        self._config: dict[str, Policy] = {}
        self._aliases: dict[str, AliasState] = {}
        self.counts: dict[tuple[str, str, str], RouteCount] = defaultdict(RouteCount)
        self._gate = ShadowGate()
        self._shadows: set[asyncio.Task] = set()
        self._watchers: set[asyncio.Queue] = set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.load_config_policies()
        await self.store.start(self.apply)

    async def close(self) -> None:
        await self.store.close()
        for task in list(self._shadows):
            task.cancel()
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)

    # ----------------------------------------------------------------- policies

    def facts(self, name: str) -> ModelFacts:
        entry = self.models.catalog.get(name)
        return ModelFacts(tuple(entry.versions),
                          tuple((t.name, t.datatype, t.dims) for t in entry.config.inputs))

    def load_config_policies(self) -> None:
        """The `routing` sections of the repository's configs (invalid ones are logged)."""
        found: dict[str, Policy] = {}
        repository = self.models.catalog.repository
        for name in repository.names():
            try:
                routing = repository.config(name).routing
                if routing is not None:
                    found[name] = self._validate(_from_config(name, routing))
            except (ConfigError, MeshError) as e:
                log.warning("routing section of model %s ignored: %s", name, e)
        changed = set(found) ^ set(self._config) | {
            m for m in found if self._config.get(m) != found[m]}
        self._config = found
        for model in changed:
            self._refresh(model)

    def _validate(self, policy: Policy) -> Policy:
        aliases = {m: p for m, p in self.policies.items() if p.alias is not None and m != policy.model}
        return validate(policy, not_found_as_none(self.facts), aliases)

    def apply(self, model: str, policy: Policy | None) -> None:
        """A runtime policy changed (from the store): put it in force at once. The store
        is shared and writable by others, so its policies are checked like the API's
        (names, sizes, alias cycles); one that fails leaves the model without a runtime
        policy."""
        if policy is not None:
            try:
                if policy.model != model:
                    raise InvalidInput(f"stored under '{model}' but names '{policy.model}'")
                aliases = {m: p for m, p in self.policies.items()
                           if p.alias is not None and m != model}
                check_stored(policy, aliases)
            except InvalidInput as e:
                log.warning("routing policy of %s from the store refused: %s", clip(model),
                            clip(e))
                policy = None
        if policy is None:
            self._runtime.pop(model, None)
        else:
            self._runtime[model] = policy
        self._refresh(model)

    def _refresh(self, model: str) -> None:
        policy = self._runtime.get(model) or self._config.get(model)
        before = self.policies.get(model)
        if policy is None:
            self.policies.pop(model, None)
            self._aliases.pop(model, None)
        else:
            self.policies[model] = policy
            if policy.alias is None:
                self._aliases.pop(model, None)
            elif before is None or before.alias != policy.alias:
                self._aliases[model] = AliasState(policy.alias, self.clock)
        if before != policy:
            log.info("routing of %s: %s", clip(model), clip(policy or "none", 1000))
            for q in list(self._watchers):
                q.put_nowait((model, policy))

    def policy(self, model: str) -> Policy | None:
        return self.policies.get(model)

    async def set(self, policy: Policy) -> Policy:
        policy = self._validate(policy)
        previous = self._runtime.get(policy.model)
        policy = replace(policy, source="runtime",
                         revision=(previous.revision + 1) if previous else 1,
                         updated_unix_ms=int(time.time() * 1000))
        await self.store.put(policy)
        self.apply(policy.model, policy)
        return policy

    async def clear(self, model: str) -> None:
        await self.store.delete(model)
        self.apply(model, None)

    async def promote(self, model: str, version: str) -> Policy:
        current = self.policies.get(model)
        if current is not None and current.alias is not None:
            raise InvalidInput(f"'{model}' is an alias: promote a version of its target model")
        return await self.set(promote(current, model, version))

    def watch(self) -> asyncio.Queue:
        """A queue of (model, policy or None) for every change from now on; unwatch it."""
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        return q

    def unwatch(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)

    def alias_target(self, model: str) -> str:
        state = self._aliases.get(model)
        return self.alias_target(state.current.model) if state is not None else model

    def alias_current(self, model: str) -> str:
        state = self._aliases.get(model)
        return str(state.current) if state is not None else ""

    def stats(self, model: str) -> list[tuple[str, str, str, RouteCount]]:
        return [(m, v, r, c) for (m, v, r), c in sorted(self.counts.items()) if m == model]

    # ---------------------------------------------------------------- inference

    async def infer(self, call: InferCall, policy: Policy) -> InferOutcome:
        if policy.alias is not None:
            return await self._infer_alias(call, policy)
        key = call.route_key or uuid.uuid4().hex
        version = choose(policy.split, unit(key)) if policy.split else ""
        outcome = None
        try:
            outcome = await self._with_fallback(call, policy, version)
            return outcome
        finally:
            for shadow in sample_shadows(policy, self.draw):
                self._start_shadow(call, policy, shadow, outcome)

    async def _with_fallback(self, call: InferCall, policy: Policy, version: str) -> InferOutcome:
        targets = [Target(call.model, version), *policy.fallback]
        deadline = None if call.timeout_s is None else self.clock() + call.timeout_s
        error: MeshError | None = None
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            if i and deadline is not None and deadline - self.clock() <= 0:
                break
            if not last and policy.fallback_queue_us and self._queue_us(target) > policy.fallback_queue_us:
                continue  # past the queue threshold: the next target takes it
            sub = replace(call, model=target.model, version=target.version,
                          timeout_s=None if deadline is None else deadline - self.clock())
            route = policy.route_of(version) if i == 0 else "fallback"
            try:
                if target.model != call.model:
                    await self._charge(target.model)
                # Served directly (version "": the default one): a fallback's own policy
                # does not apply, so fallbacks never chain into loops.
                if i == 0:
                    return await self._timed(self.models.infer_direct(sub), call.model,
                                             target.version, route)
                return await self._timed(self.models.infer_direct(sub), call.model,
                                         str(target) if target.version else "", route,
                                         unresolved=str(target))
            except FALLBACK_ERRORS as e:
                error = e
                if last:
                    raise
                log.debug("%s answered %s; falling back", clip(target), clip(e))
        raise error or DeadlineExceeded("no time left to fall back")

    def _queue_us(self, target: Target) -> float:
        version = target.version
        if not version:
            try:
                version = self.models.catalog.resolve(target.model, "")[1]
            except NotFound:
                return 0.0
        return self.models.loads.load_us(target.model, version)[0]

    async def _timed(self, work, model: str, version: str, route: str,
                     unresolved: str = "default") -> InferOutcome:
        """Counts one routed request under (model asked, version label, route); a version
        label "" becomes the version that answered ("model:version" for another model)."""
        started = time.perf_counter()
        code = "OK"
        try:
            outcome = await work
            if not version:
                version = (outcome.version if outcome.model in ("", model)
                           else f"{outcome.model}:{outcome.version}")
            return outcome
        except MeshError as e:
            code = getattr(e, "code_name", "INTERNAL")
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            version = version or unresolved
            count = self.counts[(model, version, route)]
            count.requests += 1
            count.errors += code != "OK"
            self.metrics.requests.labels(model, version, route, code).inc()
            self.metrics.seconds.labels(model, version, route).observe(time.perf_counter() - started)

    async def _infer_alias(self, call: InferCall, policy: Policy) -> InferOutcome:
        state = self._aliases[policy.model]
        spec = policy.alias
        before = state.current
        queue_us, latency_us = self.models.loads.load_us(spec.preferred.model, spec.preferred.version)
        target = state.target(queue_us, latency_us)
        if target != before:
            log.info("alias %s: %s -> %s (queue %.0fus, latency %.0fus)",
                     clip(policy.model), clip(before), clip(target), queue_us, latency_us)
            self.metrics.alias_switches.labels(policy.model, str(target)).inc()
        sub = replace(call, model=target.model, version=target.version or call.version)
        try:
            await self._charge(target.model)
            return await self._timed(self.models.infer(sub), policy.model, str(target), "alias")
        except FALLBACK_ERRORS:
            if target != spec.preferred:
                raise
            sub = replace(call, model=spec.cheaper.model, version=spec.cheaper.version or call.version)
            await self._charge(spec.cheaper.model)
            return await self._timed(self.models.infer(sub), policy.model, str(spec.cheaper), "alias")

    async def _charge(self, model: str) -> None:
        """A request served by another model than it named (an alias target, a fallback)
        takes a token from that model's rate limit too: Overloaded when it has none."""
        if self.protection is not None:
            denied = await self.protection.charge(model)
            if denied is not None:
                raise Overloaded(denied.message)

    # ------------------------------------------------------------------ shadows

    def _start_shadow(self, call: InferCall, policy: Policy, version: str,
                      primary: InferOutcome | None) -> None:
        if not self._gate.enter(policy.max_shadow_in_flight):
            self.metrics.shadow_dropped.labels(call.model).inc()
            return
        # A shadow is a request like any other: a gateway concurrency slot and a token.
        protection = self.protection
        if protection is not None and protection.acquire() is not None:
            self._gate.leave()
            self.metrics.shadow_dropped.labels(call.model).inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._shadow(call, version, primary, protection))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, call: InferCall, version: str, primary: InferOutcome | None,
                      protection=None) -> None:
        """Fire and forget: measured (latency, errors, agreement), never answered."""
        try:
            if protection is not None and await protection.charge(call.model) is not None:
                self.metrics.shadow_dropped.labels(call.model).inc()
                return
            sub = replace(call, version=version, use_cache=False)
            try:
                outcome = await self._timed(self.models.infer_direct(sub), call.model, version,
                                            "shadow")
            except MeshError as e:
                log.debug("shadow %s:%s failed: %s", clip(call.model), clip(version), clip(e))
                return
            if primary is None:
                return
            agree = self._agreement(call.model, primary.outputs, outcome.outputs)
            if agree is not None:
                count = self.counts[(call.model, version, "shadow")]
                if agree:
                    count.agree += 1
                else:
                    count.disagree += 1
                self.metrics.shadow_agreement.labels(
                    call.model, version, "agree" if agree else "disagree").inc()
        except Exception:  # noqa: BLE001 - a shadow never disturbs anything
            log.exception("shadow request to %s:%s failed", clip(call.model), clip(version))
        finally:
            self._gate.leave()
            if protection is not None:
                protection.release()

    def _agreement(self, model: str, a: Sequence, b: Sequence) -> bool | None:
        """Classifiers: equal predictions (or argmax of logits/probabilities); else None."""
        try:
            classifier = self.models.catalog.get(model).config.classifier
        except MeshError:
            return None
        if classifier is None:
            return None
        mine = {t.name: t for t in a}
        theirs = {t.name: t for t in b}
        for name in (classifier.predictions, classifier.logits, classifier.probabilities):
            if name and name in mine and name in theirs:
                x, y = _array(mine[name]), _array(theirs[name])
                if name != classifier.predictions:
                    x, y = x.argmax(-1), y.argmax(-1)
                return x.shape == y.shape and bool(np.array_equal(x, y))
        return None


def _array(t) -> np.ndarray:
    return to_numpy(t.name, t.datatype, list(t.shape), t.data)


def _from_config(model: str, r: RoutingConfig) -> Policy:
    return Policy(
        model=model, split=r.split, shadow=r.shadow,
        fallback=tuple(Target.parse(t) for t in r.fallback),
        fallback_queue_us=r.fallback_queue_us,
        max_shadow_in_flight=r.max_shadow_in_flight, source="config",
    )
