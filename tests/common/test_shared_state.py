"""State shared through a Redis hash (model control, routing policies), on a real
redis-server: a stored record nobody can read is skipped (the model has none), never fatal
to the watch, at start and on a later change."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from meshserve.common import control_store
from meshserve.common.control_store import RedisControlStore
from meshserve.common.model_control import Control, to_pb
from meshserve.gateway import routing_store
from meshserve.gateway.routing import Policy
from meshserve.gateway.routing_store import RedisPolicyStore, policy_to_pb

CORRUPT = b"\xff\xff not a record"

CASES = {
    "model control": (RedisControlStore, control_store,
                      Control("digits", True, ("1",), "1", 3),
                      lambda c: to_pb(c).SerializeToString()),
    "routing policy": (RedisPolicyStore, routing_store,
                       Policy("digits", split=(("1", 50.0), ("2", 50.0))),
                       lambda p: policy_to_pb(p).SerializeToString()),
}


@pytest.mark.parametrize("what", CASES)
def test_a_corrupt_stored_record_is_skipped_and_the_watch_goes_on(redis_server, caplog, what):
    store_type, module, good, serialize = CASES[what]
    caplog.set_level(logging.WARNING)

    async def run():
        raw = aioredis.from_url(redis_server.url)
        await raw.hset(module.REDIS_HASH, mapping={"digits": serialize(good), "broken": CORRUPT})
        applied: list = []
        changed = asyncio.Event()

        def apply(model, value):
            applied.append((model, value))
            changed.set()

        store = store_type(redis_server.url)
        try:
            await store.start(apply)  # returns once the stored records are applied
            assert ("digits", good) in applied
            assert ("broken", None) in applied
            # A change to a record nobody can read: the model has none; the watch goes on.
            changed.clear()
            await raw.hset(module.REDIS_HASH, "digits", CORRUPT)
            await raw.publish(module.REDIS_CHANNEL, "digits")
            await asyncio.wait_for(changed.wait(), 10)
            assert applied[-1] == ("digits", None)
            changed.clear()
            await raw.hset(module.REDIS_HASH, "digits", serialize(good))
            await raw.publish(module.REDIS_CHANNEL, "digits")
            await asyncio.wait_for(changed.wait(), 10)
            assert applied[-1] == ("digits", good)
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(run())
    unreadable = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert any(m.startswith(f"stored {what} of broken is unreadable") for m in unreadable)
    assert any(m.startswith(f"stored {what} of digits is unreadable") for m in unreadable)
