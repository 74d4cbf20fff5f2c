"""How full the messages of the internal hops are: messages and the items they carried
(requests, results, keys, entries) per hop, counted as plain integers on the path and
read only when Prometheus scrapes (meshserve_hop_messages_total, meshserve_hop_items_total,
by hop). Items per message is the figure that says whether a hop costs per batch or per
request: one stream message costs about the same whatever it carries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily


@dataclass(slots=True)
class HopCount:
    messages: int = 0
    items: int = 0

    def add(self, items: int) -> None:
        self.messages += 1
        self.items += items


class HopCollector:
    """Exposes the HopCounts that `counts` returns, by hop name, at scrape time."""

    def __init__(self, counts: Callable[[], Iterable[tuple[str, HopCount]]]):
        self.counts = counts

    def collect(self):
        messages = CounterMetricFamily(
            "meshserve_hop_messages", "Messages sent or received on an internal hop",
            labels=["hop"])
        items = CounterMetricFamily(
            "meshserve_hop_items", "Items (requests, results, keys, entries) those messages "
            "carried", labels=["hop"])
        totals: dict[str, HopCount] = {}
        for hop, count in self.counts():
            total = totals.setdefault(hop, HopCount())
            total.messages += count.messages
            total.items += count.items
        for hop, count in sorted(totals.items()):
            messages.add_metric([hop], count.messages)
            items.add_metric([hop], count.items)
        yield messages
        yield items


def register(registry: CollectorRegistry,
             counts: Callable[[], Iterable[tuple[str, HopCount]]]) -> None:
    registry.register(HopCollector(counts))


def parse_metrics(text: str) -> dict[str, HopCount]:
    """hop -> HopCount from a /metrics page (the bench reads them before and after)."""
    out: dict[str, HopCount] = {}
    for line in text.splitlines():
        for name, attr in (("meshserve_hop_messages_total", "messages"),
                           ("meshserve_hop_items_total", "items")):
            if line.startswith(name + "{"):
                hop = line.split('hop="', 1)[1].split('"', 1)[0]
                setattr(out.setdefault(hop, HopCount()), attr, int(float(line.rsplit(" ", 1)[1])))
    return out
