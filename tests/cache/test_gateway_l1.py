"""The gateway's in-process L1: bounded by bytes and TTL, and never kept across an
invalidation or a lost lookup stream."""

from meshserve.gateway.l1 import L1Cache


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def outputs(n: int, size: int = 40) -> bytes:
    return bytes([n % 256]) * size


def digest(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_hit_after_put_and_expiry_by_ttl():
    clock = Clock()
    l1 = L1Cache(1 << 20, clock)
    assert l1.get(digest(1)) is None
    assert l1.put(digest(1), "digits", "2", outputs(1), 10, l1.epoch("digits"))
    assert l1.get(digest(1)) == outputs(1)
    clock.now += 10.5
    assert l1.get(digest(1)) is None and len(l1) == 0 and l1.bytes == 0


def test_bounded_by_bytes_least_recently_used_first():
    l1 = L1Cache(3000)
    for n in range(40):
        l1.put(digest(n), "digits", "2", outputs(n, 400), 60, l1.epoch("digits"))
        assert l1.bytes <= 3000
    assert l1.evicted > 0
    assert l1.get(digest(39)) is not None and l1.get(digest(0)) is None
    assert not l1.put(digest(99), "digits", "2", outputs(99, 4000), 60, l1.epoch("digits"))


def test_invalidation_drops_entries_and_refuses_results_from_before_it():
    l1 = L1Cache(1 << 20)
    l1.put(digest(1), "digits", "1", outputs(1), 60, l1.epoch("digits"))
    l1.put(digest(2), "digits", "2", outputs(2), 60, l1.epoch("digits"))
    l1.put(digest(3), "cnn", "1", outputs(3), 60, l1.epoch("cnn"))
    before = l1.epoch("digits")  # a lookup sent before the reload...
    assert l1.invalidate("digits", "2") == 1
    assert l1.get(digest(2)) is None and l1.get(digest(1)) is not None
    # ...its result, computed by the old model, is not kept
    assert not l1.put(digest(4), "digits", "2", outputs(4), 60, before)
    assert l1.get(digest(4)) is None
    assert l1.invalidate("digits") == 1  # every version
    assert l1.get(digest(1)) is None and l1.get(digest(3)) is not None


def test_unusable_while_a_stream_is_down():
    l1 = L1Cache(1 << 20)
    epoch = l1.epoch("digits")
    l1.put(digest(1), "digits", "2", outputs(1), 60, epoch)
    l1.set_usable(False)
    assert l1.get(digest(1)) is None and len(l1) == 0
    assert not l1.put(digest(2), "digits", "2", outputs(2), 60, l1.epoch("digits"))
    l1.set_usable(True)
    # a lookup sent before the outage may have missed an invalidation: not kept
    assert not l1.put(digest(3), "digits", "2", outputs(3), 60, epoch)
    assert l1.put(digest(3), "digits", "2", outputs(3), 60, l1.epoch("digits"))
