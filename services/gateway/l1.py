"""The gateway's in-process L1 in front of the cache service: hot keys never leave the
process. Pure: no grpc.

Bounded by bytes (LRU) and by each entry's TTL. It obeys the cache's generation rules, so
it never serves what the cache service would not:
- an entry is kept only from a result computed under the generation its lookup returned,
  and only when no invalidation of its model reached this gateway since that lookup was
  sent (`epoch`): a result racing a reload is never kept;
- the cache service sends every invalidation to every gateway's lookup stream
  (`invalidate`): the model's (or version's) entries go at once;
- while a lookup stream is down, invalidations could be missed: the L1 is emptied and
  unused (`usable` false) until every stream is back.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Per entry, on top of its value: the record, the dict slot.
ENTRY_OVERHEAD_BYTES = 200


@dataclass(slots=True)
class _Entry:
    model: str
    version: str
    value: bytes  # a serialized CachedOutputs, as the cache service holds it
    expires_at: float
    size: int


class L1Cache:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._epochs: dict[str, int] = {}  # model -> invalidations seen
        self._outages = 0  # times the L1 became unusable
        self.usable = True
        self.hits = self.misses = self.stored = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def epoch(self, model: str) -> tuple[int, int]:
        """Read before the lookup is sent; given back to put()."""
        return self._outages, self._epochs.get(model, 0)

    def get(self, digest: bytes) -> bytes | None:
        if not self.usable:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at <= self._clock():
            self._remove(digest)
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return entry.value

    def put(self, digest: bytes, model: str, version: str, value: bytes, ttl_s: float,
            epoch: tuple[int, int]) -> bool:
        """Keeps value unless an invalidation of the model arrived since `epoch` was read
        (or the L1 is unusable, or the entry alone exceeds the bound)."""
        if not self.usable or epoch != self.epoch(model) or ttl_s <= 0:
            return False
        size = ENTRY_OVERHEAD_BYTES + len(digest) + len(value)
        if size > self.max_bytes:
            return False
        if digest in self._entries:
            self._remove(digest)
        self._entries[digest] = _Entry(model, version, value, self._clock() + ttl_s, size)
        self._bytes += size
        self.stored += 1
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evicted += 1
        return True

    def invalidate(self, model: str, version: str = "") -> int:
        """Drops a model version's entries ("": every version's); results in flight from
        before are not kept. Returns the entries dropped."""
        self._epochs[model] = self._epochs.get(model, 0) + 1
        doomed = [d for d, e in self._entries.items()
                  if e.model == model and (not version or e.version == version)]
        for digest in doomed:
            self._remove(digest)
        return len(doomed)

    def set_usable(self, usable: bool) -> None:
        """False: every entry goes, and every put until then is refused (epochs move)."""
        if not usable:
            self._entries.clear()
            self._bytes = 0
            self._outages += 1
        self.usable = usable

    def _remove(self, digest: bytes) -> None:
        entry = self._entries.pop(digest)
        self._bytes -= entry.size


class L1Collector:
    """meshserve_gateway_l1_{hits,misses,evictions}_total, _entries and _bytes at scrape."""

    def __init__(self, l1: L1Cache):
        self.l1 = l1

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        l1 = self.l1
        for name, doc, value in (("hits", "Lookups the gateway's L1 answered", l1.hits),
                                 ("misses", "Lookups the gateway's L1 passed on", l1.misses),
                                 ("evictions", "L1 entries evicted for space", l1.evicted)):
            yield CounterMetricFamily(f"meshserve_gateway_l1_{name}", doc, value=value)
        yield GaugeMetricFamily("meshserve_gateway_l1_entries", "Entries in the L1",
                                value=len(l1))
        yield GaugeMetricFamily("meshserve_gateway_l1_bytes", "Bytes held by the L1",
                                value=l1.bytes)
