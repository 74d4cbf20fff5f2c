"""meshserve.v1.ModelControlStore, served by the batcher: the cluster model control
(common.model_control) of a mesh without Redis. Gateways write every record to every
batcher; each batcher applies what it receives at once (BoardControlStore) and streams
every change to the gateways watching it."""

from __future__ import annotations

from meshserve.common.grpcutil import grpc_errors
from meshserve.common.shared_state import Board
from meshserve.pb.meshserve.v1 import model_control_pb2 as mpb
from meshserve.pb.meshserve.v1 import model_control_pb2_grpc as mpb_grpc

SERVICE_NAME = mpb.DESCRIPTOR.services_by_name["ModelControlStore"].full_name


class ModelControlStoreServicer(mpb_grpc.ModelControlStoreServicer):
    def __init__(self, board: Board):
        self.board = board

    @grpc_errors
    async def Put(self, request, context):
        return self.board.put(request)

    @grpc_errors
    async def Watch(self, request, context):
        done = mpb.ModelControlChange(snapshot_done=True)
        async for change in self.board.watch(request.model, done):
            yield change


def attach(server) -> Board:
    board = Board("model control")
    mpb_grpc.add_ModelControlStoreServicer_to_server(ModelControlStoreServicer(board), server)
    return board
