"""Traffic management, the pure part: routing policies, weighted and sticky version choice,
shadow sampling, validation, per-version load (EWMA of queue time and latency) and the
cost-aware alias state machine. Imports neither grpc nor protobuf."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from meshserve.common.errors import InvalidInput, NotFound
from meshserve.common.repository import check_model_name

DEFAULT_MAX_SHADOW_IN_FLIGHT = 64
# Bounds of one policy: what a gateway holds and works through per request.
MAX_SPLIT = 32
MAX_SHADOW = 4
MAX_FALLBACK = 4
MAX_SHADOW_IN_FLIGHT = 1024
MAX_VERSION_CHARS = 20
ROUTES = ("primary", "canary", "shadow", "fallback", "alias")


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    version: str = ""  # "": the model's own routing (its policy, else its default version)

    def __str__(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model

    @classmethod
    def parse(cls, text: str) -> Target:
        """"model" or "model:version"."""
        model, _, version = text.strip().partition(":")
        return cls(model, version)


@dataclass(frozen=True, slots=True)
class AliasSpec:
    preferred: Target
    cheaper: Target
    high_queue_us: int = 0
    low_queue_us: int = 0
    high_latency_us: int = 0
    low_latency_us: int = 0
    min_dwell_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Policy:
    model: str
    split: tuple[tuple[str, float], ...] = ()  # (version, percent); sums to 100 once validated
    shadow: tuple[tuple[str, float], ...] = ()  # (version, percent of requests mirrored)
    fallback: tuple[Target, ...] = ()
    fallback_queue_us: int = 0  # 0: fall back on errors only
    alias: AliasSpec | None = None
    max_shadow_in_flight: int = DEFAULT_MAX_SHADOW_IN_FLIGHT
    source: str = "runtime"  # or "config"
    revision: int = 0
    updated_unix_ms: int = 0

    @property
    def primary_version(self) -> str:
        """The version with the largest weight (the first of equals); "" without a split."""
        best = max(self.split, key=lambda vw: vw[1], default=("", 0.0))
        return best[0]

    def route_of(self, version: str) -> str:
        return "primary" if not version or version == self.primary_version else "canary"

    @property
    def empty(self) -> bool:
        return not (self.split or self.shadow or self.fallback or self.alias)

    @property
    def models(self) -> list[str]:
        """Every model (or alias) this policy names: its own and each target's."""
        targets = [*self.fallback]
        if self.alias is not None:
            targets += [self.alias.preferred, self.alias.cheaper]
        return list(dict.fromkeys([self.model, *(t.model for t in targets if t.model)]))


# ------------------------------------------------------------------------- choice


def unit(key: str, salt: str = "") -> float:
    """A stable hash of key onto [0, 1): the same key always lands on the same point."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose(split: tuple[tuple[str, float], ...], u: float) -> str:
    """The version whose cumulative-percentage interval holds u (in [0, 1))."""
    point = u * 100.0
    total = 0.0
    chosen = ""
    for version, weight in split:
        if weight <= 0:
            continue
        total += weight
        chosen = version
        if point < total:
            return version
    return chosen  # rounding: the last version with a positive weight


def sample_shadows(policy: Policy, draw: Callable[[], float]) -> list[str]:
    """Versions this request is mirrored to: each with its own percentage."""
    return [v for v, percent in policy.shadow if draw() * 100.0 < percent]


def promote(policy: Policy | None, model: str, version: str) -> Policy:
    """`version` at 100% (weights of the others 0, so they stay listed); it is no longer shadowed."""
    base = policy or Policy(model)
    others = tuple((v, 0.0) for v, _w in base.split if v != version)
    return replace(base, split=((version, 100.0), *others),
                   shadow=tuple(s for s in base.shadow if s[0] != version), source="runtime")


# --------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What validation needs to know of one repository model."""

    versions: tuple[str, ...]
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, datatype, dims)


def _weights(where: str, pairs, versions: tuple[str, ...], model: str, maximum: float | None):
    seen = set()
    for version, weight in pairs:
        if version in seen:
            raise InvalidInput(f"{where}: version {version} is listed twice")
        seen.add(version)
        if version not in versions:
            served = ", ".join(versions) or "none"
            raise InvalidInput(f"{where}: model '{model}' has no version '{version}' "
                               f"(served: {served})")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInput(f"{where}: weight of version {version} must be >= 0, got {weight}")
        if maximum is not None and not 0 < weight <= maximum:
            raise InvalidInput(f"{where}: version {version}: the percentage must be in "
                               f"(0, {maximum:g}], got {weight:g}")


def check_stored(policy: Policy, aliases: Mapping[str, Policy]) -> Policy:
    """What a gateway checks of every policy it takes from the shared store (another
    gateway validated it, but the store is writable by others): names, sizes and alias
    cycles, which need no repository. InvalidInput naming what is wrong."""
    _check_bounds(policy)
    if policy.alias is not None:
        _no_alias_cycle(policy.model, policy.alias, aliases)
    return policy


def _check_bounds(policy: Policy) -> None:
    model = policy.model
    try:
        for name in policy.models:
            check_model_name(name)
    except InvalidInput as e:
        raise InvalidInput(f"routing policy: {e}") from None
    for what, items, bound in (("split", policy.split, MAX_SPLIT),
                               ("shadow", policy.shadow, MAX_SHADOW),
                               ("fallback", policy.fallback, MAX_FALLBACK)):
        if len(items) > bound:
            raise InvalidInput(f"routing policy of '{model}': {len(items)} {what} entries, "
                               f"at most {bound}")
    versions = [v for v, _w in (*policy.split, *policy.shadow)]
    versions += [t.version for t in policy.fallback]
    if policy.alias is not None:
        versions += [policy.alias.preferred.version, policy.alias.cheaper.version]
    for version in versions:
        if version and not (version.isdigit() and len(version) <= MAX_VERSION_CHARS):
            raise InvalidInput(f"routing policy of '{model}': {version[:40]!r} is not a version")
    if not 0 <= policy.max_shadow_in_flight <= MAX_SHADOW_IN_FLIGHT:
        raise InvalidInput(f"routing policy of '{model}': max_shadow_in_flight must be in "
                           f"[0, {MAX_SHADOW_IN_FLIGHT}], got {policy.max_shadow_in_flight}")


def _no_alias_cycle(model: str, spec: AliasSpec, aliases: Mapping[str, Policy]) -> None:
    """Follows alias targets from `model` (with `spec` in place): InvalidInput on a cycle."""
    graph = {name: p.alias for name, p in aliases.items() if p.alias is not None}
    graph[model] = spec
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            raise InvalidInput("alias cycle: " + " -> ".join([*path[path.index(name):], name]))
        a = graph.get(name)
        if a is None:
            return
        path.append(name)
        visit(a.preferred.model)
        visit(a.cheaper.model)
        path.pop()

    visit(model)


def validate(policy: Policy, facts: Callable[[str], ModelFacts | None],
             aliases: Mapping[str, Policy]) -> Policy:
    """The policy, normalised (split weights scaled to sum to 100, alias low marks
    defaulted); InvalidInput naming what is wrong. facts(name) is None for a name that is
    not a repository model; aliases are the alias policies in force (for cycles)."""
    model = policy.model
    _check_bounds(policy)
    if policy.empty:
        raise InvalidInput(f"routing policy for '{model}' is empty: give a split, shadow, "
                           "fallback or alias (or clear the policy)")
    if policy.fallback_queue_us < 0 or policy.max_shadow_in_flight < 0:
        raise InvalidInput("fallback_queue_us and max_shadow_in_flight must be >= 0")
    policy = replace(policy, max_shadow_in_flight=policy.max_shadow_in_flight
                     or DEFAULT_MAX_SHADOW_IN_FLIGHT)
    own = facts(model)
    if policy.alias is not None:
        return _validate_alias(policy, own, facts, aliases)
    if own is None:
        raise InvalidInput(f"routing policy: '{model}' is not a model in the repository "
                           "(an alias needs an alias section)")
    _weights(f"split of '{model}'", policy.split, own.versions, model, None)
    split = policy.split
    if split:
        total = sum(w for _v, w in split)
        if total <= 0:
            raise InvalidInput(f"split of '{model}': the weights sum to 0")
        split = tuple((v, w * 100.0 / total) for v, w in split)
    _weights(f"shadow of '{model}'", policy.shadow, own.versions, model, 100.0)
    for i, target in enumerate(policy.fallback):
        where = f"fallback[{i}] '{target}' of '{model}'"
        if target.model == model and not target.version:
            raise InvalidInput(f"{where}: a fallback to the model itself needs a version")
        other = own if target.model == model else facts(target.model)
        if other is None:
            raise InvalidInput(f"{where}: '{target.model}' is not a model in the repository")
        if target.version and target.version not in other.versions:
            raise InvalidInput(f"{where}: model '{target.model}' has no version "
                               f"'{target.version}' (served: {', '.join(other.versions) or 'none'})")
        if sorted(other.inputs) != sorted(own.inputs):
            raise InvalidInput(
                f"{where}: its inputs {_describe(other.inputs)} differ from "
                f"'{model}''s {_describe(own.inputs)} (a fallback must take the same inputs "
                "and datatypes)")
    return replace(policy, split=split)


def _describe(inputs) -> str:
    return "[" + ", ".join(f"{n} {d} {list(s)}" for n, d, s in sorted(inputs)) + "]"


def _validate_alias(policy: Policy, own: ModelFacts | None, facts, aliases) -> Policy:
    model, spec = policy.model, policy.alias
    if own is not None:
        raise InvalidInput(f"alias '{model}': the name is a model in the repository; "
                           "an alias needs a name of its own")
    if policy.split or policy.shadow or policy.fallback:
        raise InvalidInput(f"alias '{model}': an alias takes no split, shadow or fallback "
                           "(give them to its target models)")
    for key, target in (("preferred", spec.preferred), ("cheaper", spec.cheaper)):
        if not target.model:
            raise InvalidInput(f"alias '{model}': {key} target is required")
        if target.model == model:
            raise InvalidInput(f"alias cycle: {model} -> {model}")
        f = facts(target.model)
        if f is None:
            if target.model not in aliases or target.version:
                raise InvalidInput(f"alias '{model}': {key} target '{target}' is neither a "
                                   "repository model nor an alias")
        elif target.version and target.version not in f.versions:
            raise InvalidInput(f"alias '{model}': {key} target '{target}': no such version "
                               f"(served: {', '.join(f.versions) or 'none'})")
    if not (spec.high_queue_us or spec.high_latency_us):
        raise InvalidInput(f"alias '{model}': set high_queue_us or high_latency_us (the load "
                           "above which it switches to the cheaper target)")
    low_q = spec.low_queue_us or spec.high_queue_us // 2
    low_l = spec.low_latency_us or spec.high_latency_us // 2
    if spec.high_queue_us and low_q >= spec.high_queue_us:
        raise InvalidInput(f"alias '{model}': low_queue_us {low_q} must be below "
                           f"high_queue_us {spec.high_queue_us}")
    if spec.high_latency_us and low_l >= spec.high_latency_us:
        raise InvalidInput(f"alias '{model}': low_latency_us {low_l} must be below "
                           f"high_latency_us {spec.high_latency_us}")
    if not math.isfinite(spec.min_dwell_s) or spec.min_dwell_s < 0:
        raise InvalidInput(f"alias '{model}': min_dwell_s must be >= 0, got {spec.min_dwell_s}")
    _no_alias_cycle(model, spec, aliases)
    return replace(policy, alias=replace(spec, low_queue_us=low_q, low_latency_us=low_l))


def not_found_as_none(lookup: Callable[[str], ModelFacts]) -> Callable[[str], ModelFacts | None]:
    def facts(name: str) -> ModelFacts | None:
        try:
            return lookup(name)
        except NotFound:
            return None
    return facts


# --------------------------------------------------------------------------- load


class LoadTracker:
    """Per (model, version): EWMAs of queue time and latency (queue + compute) from the
    batcher's results. A value decays by half every half_life_s without samples, so a
    version nobody sends to (its traffic moved away) is seen to cool down."""

    def __init__(self, alpha: float = 0.2, half_life_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < alpha <= 1 or half_life_s <= 0:
            raise ValueError("alpha must be in (0, 1] and half_life_s > 0")
        self.alpha, self.half_life_s, self.clock = alpha, half_life_s, clock
        self._state: dict[tuple[str, str], list[float]] = {}  # [queue_us, latency_us, at]
        self._versions: dict[str, set[str]] = {}

    def observe(self, model: str, version: str, queue_ns: int, compute_ns: int) -> None:
        now = self.clock()
        queue_us, latency_us = queue_ns / 1e3, (queue_ns + compute_ns) / 1e3
        s = self._state.get((model, version))
        if s is None:
            self._state[(model, version)] = [queue_us, latency_us, now]
            self._versions.setdefault(model, set()).add(version)
            return
        decay = self._decay(s[2], now)
        a = self.alpha
        s[0] = (1 - a) * s[0] * decay + a * queue_us
        s[1] = (1 - a) * s[1] * decay + a * latency_us
        s[2] = now

    def _decay(self, at: float, now: float) -> float:
        return 0.5 ** (max(0.0, now - at) / self.half_life_s)

    def load_us(self, model: str, version: str = "") -> tuple[float, float]:
        """(queue_us, latency_us) now; version "": the most loaded version of the model."""
        now = self.clock()
        versions = [version] if version else self._versions.get(model, ())
        queue = latency = 0.0
        for v in versions:
            s = self._state.get((model, v))
            if s is not None:
                d = self._decay(s[2], now)
                queue, latency = max(queue, s[0] * d), max(latency, s[1] * d)
        return queue, latency


class AliasState:
    """Which target an alias sends to: the preferred one until its load crosses a high
    mark, the cheaper one until the load is below every low mark; never switching twice
    within min_dwell_s."""

    def __init__(self, spec: AliasSpec, clock: Callable[[], float] = time.monotonic):
        self.spec, self.clock = spec, clock
        self.on_cheaper = False
        self.since = -math.inf
        self.switches = 0

    def target(self, queue_us: float, latency_us: float) -> Target:
        s = self.spec
        now = self.clock()
        if now - self.since >= s.min_dwell_s:
            if not self.on_cheaper:
                high = ((s.high_queue_us and queue_us > s.high_queue_us)
                        or (s.high_latency_us and latency_us > s.high_latency_us))
                if high:
                    self._switch(now)
            else:
                low = ((not s.high_queue_us or queue_us < s.low_queue_us)
                       and (not s.high_latency_us or latency_us < s.low_latency_us))
                if low:
                    self._switch(now)
        return s.cheaper if self.on_cheaper else s.preferred

    @property
    def current(self) -> Target:
        return self.spec.cheaper if self.on_cheaper else self.spec.preferred

    def _switch(self, now: float) -> None:
        self.on_cheaper = not self.on_cheaper
        self.since = now
        self.switches += 1


class ShadowGate:
    """Bounds the shadow requests in flight; a request over the bound is not mirrored."""

    def __init__(self) -> None:
        self.in_flight = 0

    def enter(self, limit: int) -> bool:
        if self.in_flight >= limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
