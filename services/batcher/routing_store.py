"""meshserve.v1.RoutingStore, served by the batcher: the one copy of runtime routing
policies for gateways without Redis. Gateways validate; this store only keeps the latest
policy per model and streams every change to its watchers. Held in memory: it survives
gateway restarts, not a batcher restart (use Redis for that)."""

from __future__ import annotations

import asyncio
import logging

from meshserve.common.grpcutil import grpc_errors
from meshserve.common.logs import clip
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RoutingStore"].full_name


class PolicyBoard:
    """model -> its latest PolicyChange; each watcher gets every change on its own queue."""

    def __init__(self) -> None:
        self.policies: dict[str, rpb.PolicyChange] = {}
        self._watchers: set[asyncio.Queue] = set()

    def put(self, change: rpb.PolicyChange) -> rpb.PolicyChange:
        if change.deleted:
            self.policies.pop(change.model, None)
        else:
            self.policies[change.model] = change
        log.info("routing policy of %s %s", clip(change.model), "removed" if change.deleted else "set")
        for q in list(self._watchers):
            q.put_nowait(change)
        return change

    def subscribe(self) -> tuple[list[rpb.PolicyChange], asyncio.Queue]:
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        return list(self.policies.values()), q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)


class RoutingStoreServicer(rpb_grpc.RoutingStoreServicer):
    def __init__(self, board: PolicyBoard):
        self.board = board

    @grpc_errors
    async def Put(self, request, context):
        return self.board.put(request)

    @grpc_errors
    async def Watch(self, request, context):
        snapshot, queue = self.board.subscribe()
        try:
            for change in snapshot:
                if not request.model or change.model == request.model:
                    yield change
            yield rpb.PolicyChange(snapshot_done=True)
            while True:
                change = await queue.get()
                if not request.model or change.model == request.model:
                    yield change
        finally:
            self.board.unsubscribe(queue)


def attach(server) -> PolicyBoard:
    board = PolicyBoard()
    rpb_grpc.add_RoutingStoreServicer_to_server(RoutingStoreServicer(board), server)
    return board
