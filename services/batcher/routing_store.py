"""meshserve.v1.RoutingStore, served by the batcher: the one copy of runtime routing
policies for gateways without Redis. Gateways validate; this store only keeps the latest
policy per model and streams every change to its watchers. Held in memory: it survives
gateway restarts, not a batcher restart (use Redis for that)."""

from __future__ import annotations

from meshserve.common.grpcutil import grpc_errors
from meshserve.common.shared_state import Board
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RoutingStore"].full_name


class RoutingStoreServicer(rpb_grpc.RoutingStoreServicer):
    def __init__(self, board: Board):
        self.board = board

    @grpc_errors
    async def Put(self, request, context):
        return self.board.put(request)

    @grpc_errors
    async def Watch(self, request, context):
        async for change in self.board.watch(request.model, rpb.PolicyChange(snapshot_done=True)):
            yield change


def attach(server) -> Board:
    board = Board("routing policy")
    rpb_grpc.add_RoutingStoreServicer_to_server(RoutingStoreServicer(board), server)
    return board
