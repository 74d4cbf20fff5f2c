"""Baselines for `make bench`, one grpc.aio v2 server process each:

- what a user would write without us: the TorchScript model called once per request (no
  batching, no cache);
- `--noop`: a do-nothing server that parses the request and answers a fixed response, the
  ceiling of the method (the load generator and one public gRPC call, nothing else).

Both run as a service's process does (common.logs.run: the same event loop, uvloop unless
MESHSERVE_EVENT_LOOP=asyncio).

    python -m bench.baseline_server --model models/digits/2/model.pt --port 9001 [--noop]
"""

from __future__ import annotations

import argparse

import grpc
import numpy as np
import torch

from meshserve.common import logs
from meshserve.common.grpcutil import server_options
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str):
        self.model = torch.jit.load(model_path)
        self.model.eval()

    async def ModelInfer(self, request, context):
        t = request.inputs[0]
        x = torch.from_numpy(np.frombuffer(request.raw_input_contents[0], np.float32)
                             .reshape(tuple(t.shape)).copy())
        with torch.inference_mode():
            logits = self.model(x)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        response.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        response.raw_output_contents.append(logits.numpy().tobytes())
        return response


class NoopServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Parses the request (grpc does) and answers a fixed response: no model, no work."""

    def __init__(self):
        response = pb.ModelInferResponse(model_name="digits", model_version="1")
        response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(bytes(40))
        self.response = response

    async def ModelInfer(self, request, context):
        return self.response


async def serve(model_path: str, port: int, threads: int, noop: bool = False) -> None:
    torch.set_num_threads(threads)
    server = grpc.aio.server(options=server_options())
    servicer = NoopServicer() if noop else Servicer(model_path)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="", help="path of a TorchScript file")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--noop", action="store_true", help="answer a fixed response, no model")
    a = p.parse_args()
    if not a.noop and not a.model:
        p.error("--model is required (or --noop)")
    # As the mesh's services run (their event loop, the imports frozen from the collector):
    # the ceiling stays like for like.
    logs.run(serve(a.model, a.port, a.threads, a.noop), "baseline")


if __name__ == "__main__":
    main()
