"""Server plumbing: reflection describes our services from our own descriptor pool, and
our `inference` messages live beside tritonclient's in one process."""

import asyncio

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshserve.common import grpcutil
from meshserve.pb.inference import grpc_service_pb2 as pb


def test_reflection_lists_and_describes_every_service():
    async def run():
        server, port, _health = grpcutil.new_server("127.0.0.1:0", ["inference.GRPCInferenceService"])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)

                async def ask(**kwargs):
                    async for reply in stub.ServerReflectionInfo(
                            iter([reflection_pb2.ServerReflectionRequest(**kwargs)])):
                        return reply

                listed = await ask(list_services="")
                names = {s.name for s in listed.list_services_response.service}
                found = {}
                for symbol in ("inference.GRPCInferenceService", "grpc.health.v1.Health",
                               "inference.ModelInferRequest"):
                    reply = await ask(file_containing_symbol=symbol)
                    found[symbol] = reply.WhichOneof("message_response")
                return names, found
        finally:
            await server.stop(0)

    names, found = asyncio.run(run())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert set(found.values()) == {"file_descriptor_response"}


def test_our_inference_messages_coexist_with_tritonclient():
    from tritonclient.grpc import service_pb2 as triton

    ours = pb.ModelInferRequest(model_name="digits", id="7")
    ours.parameters["priority"].int64_param = 1
    theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "digits" and theirs.parameters["priority"].int64_param == 1
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == ours
