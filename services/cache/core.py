"""The prediction cache in front of a backend: validation, the entry size limit, default
TTLs, metrics, and the rule that a cache failure never fails a call (lookups become
misses, stores are dropped, both counted)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshserve.cache.backends import Backend, BackendUnavailable, Entry, Key, Result, StoreOutcome
from meshserve.cache.keys import DIGEST_BYTES
from meshserve.common.errors import InvalidInput, Unavailable

log = logging.getLogger(__name__)

_FORBIDDEN = set("{}/")


@dataclass(frozen=True, slots=True)
class Stats:
    backend: str
    hits: int
    misses: int
    errors: int  # lookup keys answered as misses because the backend failed, + dropped stores
    stores: int
    too_large: int
    entries: int
    bytes: int


class PredictionCache:
    def __init__(self, backend: Backend, registry: CollectorRegistry, *, default_ttl_s: int,
                 max_entry_bytes: int):
        if default_ttl_s <= 0 or max_entry_bytes <= 0:
            raise ValueError("default_ttl_s and max_entry_bytes must be positive")
        self.backend = backend
        self.default_ttl_s = default_ttl_s
        self.max_entry_bytes = max_entry_bytes
        self._hits = self._misses = self._errors = self._stores = self._too_large = 0
        self._requests = Counter(
            "meshserve_cache_requests", "Lookups per key, by result.", ["result"],
            registry=registry)
        self._lookup_seconds = Histogram(
            "meshserve_cache_lookup_seconds", "Time to answer one Lookup call.",
            registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 1.0))
        self._store_entries = Counter(
            "meshserve_cache_store_entries", "Stored entries, by outcome.", ["outcome"],
            registry=registry)
        self._too_large_total = Counter(
            "meshserve_cache_too_large_entries",
            "Entries not cached because they exceed --max-entry-bytes.", registry=registry)
        if backend.name == "memory":
            Gauge("meshserve_cache_entries", "Entries held in memory.", registry=registry
                  ).set_function(lambda: backend.usage()[0])
            Gauge("meshserve_cache_bytes", "Bytes held in memory.", registry=registry
                  ).set_function(lambda: backend.usage()[1])

    async def lookup(self, keys: Sequence[Key]) -> list[Result]:
        for key in keys:
            _check_key(key)
        start = time.perf_counter()
        try:
            results = await self.backend.lookup(keys) if keys else []
        except BackendUnavailable as exc:
            log.debug("lookup answered as misses: %s", exc)
            self._errors += len(keys)
            self._requests.labels("error").inc(len(keys))
            return [Result(False, b"", 0)] * len(keys)
        finally:
            self._lookup_seconds.observe(time.perf_counter() - start)
        hits = sum(r.hit for r in results)
        self._hits += hits
        self._misses += len(results) - hits
        self._requests.labels("hit").inc(hits)
        self._requests.labels("miss").inc(len(results) - hits)
        return results

    async def store(self, entries: Sequence[Entry]) -> StoreOutcome:
        for entry in entries:
            _check_key(entry.key)
        fitting = [e for e in entries if len(e.value) <= self.max_entry_bytes]
        too_large = len(entries) - len(fitting)
        fitting = [
            e if e.ttl_s else Entry(e.key, e.value, e.generation, self.default_ttl_s)
            for e in fitting
        ]
        try:
            outcome = await self.backend.store(fitting) if fitting else StoreOutcome()
        except BackendUnavailable as exc:
            log.debug("store dropped: %s", exc)
            outcome = StoreOutcome(dropped=len(fitting))
        outcome = StoreOutcome(outcome.stored, outcome.skipped + too_large, outcome.dropped)
        self._too_large += too_large
        self._stores += outcome.stored
        self._errors += outcome.dropped
        self._too_large_total.inc(too_large)
        for name in ("stored", "skipped", "dropped"):
            self._store_entries.labels(name).inc(getattr(outcome, name))
        return outcome

    async def invalidate(self, model: str, version: str | None) -> int:
        """Removes a model version's entries (every version's when version is None).
        Raises Unavailable when the backend cannot be reached: the caller must retry,
        or entries of the old model could be served once it is back."""
        _check_name("model", model)
        if version is not None:
            _check_name("version", version)
        try:
            removed = await self.backend.invalidate(model, version)
        except BackendUnavailable as exc:
            raise Unavailable(f"cache backend unavailable, nothing invalidated: {exc}") from exc
        log.info("invalidated %s version %s: %d entries removed", model, version or "*", removed)
        return removed

    def stats(self) -> Stats:
        entries, size = self.backend.usage()
        return Stats(self.backend.name, self._hits, self._misses, self._errors, self._stores,
                     self._too_large, entries, size)

    async def ready(self) -> bool:
        return await self.backend.ping()

    async def close(self) -> None:
        await self.backend.close()


def _check_name(what: str, name: str) -> None:
    if not name:
        raise InvalidInput(f"{what} name is empty")
    if _FORBIDDEN & set(name):
        raise InvalidInput(f"{what} name {name!r} contains one of '{{', '}}', '/'")


def _check_key(key: Key) -> None:
    _check_name("model", key.model)
    _check_name("version", key.version)
    if len(key.digest) != DIGEST_BYTES:
        raise InvalidInput(
            f"digest of {key.model} version {key.version} is {len(key.digest)} bytes; "
            f"expected {DIGEST_BYTES} (meshserve.cache.keys.request_digest)")
