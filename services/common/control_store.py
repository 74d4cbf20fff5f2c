"""Where cluster model control (common.model_control) lives, and how replicas watch it.

- RedisControlStore (the mesh has Redis: gateways and batchers get --redis-url): one hash
  field per model (serialized meshserve.v1.ModelControl), a pub/sub message per change.
  Survives restarts of every replica; a replica that starts late or restarts reads it all.
- Without Redis, each batcher keeps the records on its board (BoardControlStore) and serves
  meshserve.v1.ModelControlStore; gateways (GatewayControlStore) write every record to
  every batcher they reach and watch one of them. Held in memory: a restarted batcher
  starts empty (use Redis for that).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis

from meshserve.common import grpcutil
from meshserve.common.errors import Unavailable
from meshserve.common.logs import clip, redact_url
from meshserve.common.model_control import Control, from_pb, parse, to_pb
from meshserve.common.shared_state import (
    Board,
    Synced,
    put_redis,
    start_watch,
    stop,
    watch_redis,
    watch_stream,
)
from meshserve.common.transport import Transport
from meshserve.pb.meshserve.v1 import model_control_pb2 as mpb
from meshserve.pb.meshserve.v1 import model_control_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

REDIS_HASH = "meshserve:models:control"
REDIS_CHANNEL = "meshserve:models:changes"
WHAT = "model control"

Apply = Callable[[str, Control | None], None]


def _change(control: Control) -> mpb.ModelControlChange:
    return mpb.ModelControlChange(model=control.model, control=to_pb(control))


class RedisControlStore:
    def __init__(self, url: str, start_wait_s: float = 5.0):
        self.url = url
        self.redis = aioredis.from_url(url)
        self.start_wait_s = start_wait_s
        self._task = None

    async def start(self, apply: Apply) -> None:
        self.synced = Synced(apply)
        self._task = await start_watch(
            watch_redis(self.redis, REDIS_HASH, REDIS_CHANNEL, self.synced, parse, WHAT),
            self.synced, self.start_wait_s, WHAT, f"Redis at {redact_url(self.url)}")

    async def put(self, control: Control) -> None:
        try:
            await put_redis(self.redis, REDIS_HASH, REDIS_CHANNEL, control.model,
                            to_pb(control).SerializeToString())
        except Exception as e:  # noqa: BLE001 - redis errors, connection errors
            raise Unavailable(f"cannot store the model control of '{control.model}' in "
                              f"Redis: {e}") from None

    async def close(self) -> None:
        await stop(self._task)
        await self.redis.aclose()


class BoardControlStore:
    """The batcher's own board (no Redis): what gateways Put on it is applied at once."""

    def __init__(self, board: Board):
        self.board = board

    async def start(self, apply: Apply) -> None:
        self.board.listeners.append(
            lambda c: apply(c.model, None if c.deleted else from_pb(c.control)))

    async def put(self, control: Control) -> None:
        self.board.put(_change(control))

    async def close(self) -> None:
        pass


class GatewayControlStore:
    """A gateway without Redis: records go to every batcher (`each`: a call on every
    batcher's channel, see BatcherClient.each); the gateway watches the first target."""

    def __init__(self, target: str, each, transport: Transport | None = None,
                 start_wait_s: float = 5.0):
        self.target = grpcutil.split_targets(target)[0]
        self.each = each
        self.transport = transport
        self.start_wait_s = start_wait_s
        self._channel: grpc.aio.Channel | None = None
        self._task = None

    async def start(self, apply: Apply) -> None:
        self._channel = grpcutil.channel(self.target, self.transport)
        stub = mpb_grpc.ModelControlStoreStub(self._channel)
        self.synced = Synced(apply)
        self._task = await start_watch(
            watch_stream(lambda: stub.Watch(mpb.WatchModelControlRequest()), self.synced,
                         lambda c: from_pb(c.control), WHAT),
            self.synced, self.start_wait_s, WHAT, f"the batcher at {self.target}")

    async def put(self, control: Control) -> None:
        change = _change(control)
        answers = await self.each(
            lambda channel: mpb_grpc.ModelControlStoreStub(channel).Put(change, timeout=5.0))
        failed = [(a, r) for a, r in answers if isinstance(r, Exception)]
        for address, error in failed:
            log.warning("model control of %s not stored on the batcher at %s: %s",
                        clip(control.model), address, error)
        if len(failed) == len(answers):
            raise Unavailable(f"no batcher stored the model control of '{control.model}': "
                              + "; ".join(f"{a}: {e}" for a, e in failed))

    async def close(self) -> None:
        await stop(self._task)
        if self._channel is not None:
            await self._channel.close()
