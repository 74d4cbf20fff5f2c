"""meshserve.v1.RoutingStore, served by the batcher: the one copy of runtime routing
policies for gateways without Redis. Gateways validate against the repository; this store
refuses what needs no repository to refuse (names, sizes, alias cycles: INVALID_ARGUMENT,
as every gateway also checks what it reads), keeps the latest policy per model and streams
every change to its watchers. Held in memory: it survives
gateway restarts, not a batcher restart (use Redis for that)."""

from __future__ import annotations

from meshserve.common.errors import InvalidInput
from meshserve.common.grpcutil import grpc_errors
from meshserve.common.logs import clip
from meshserve.common.shared_state import Board
from meshserve.gateway.routing import check_stored
from meshserve.gateway.routing_store import policy_from_pb
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RoutingStore"].full_name


class RoutingStoreServicer(rpb_grpc.RoutingStoreServicer):
    def __init__(self, board: Board):
        self.board = board

    @grpc_errors
    async def Put(self, request, context):
        if not request.deleted:
            policy = policy_from_pb(request.policy)
            if policy.model != request.model:
                raise InvalidInput(f"routing policy stored under '{clip(request.model)}' names "
                                   f"'{clip(policy.model)}'")
            aliases = {m: policy_from_pb(c.policy) for m, c in self.board.entries.items()
                       if m != request.model}
            check_stored(policy, aliases)
        return self.board.put(request)

    @grpc_errors
    async def Watch(self, request, context):
        async for change in self.board.watch(request.model, rpb.PolicyChange(snapshot_done=True)):
            yield change


def attach(server) -> Board:
    board = Board("routing policy")
    rpb_grpc.add_RoutingStoreServicer_to_server(RoutingStoreServicer(board), server)
    return board
