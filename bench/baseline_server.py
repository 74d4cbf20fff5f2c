"""What a user would write without us: one process, a grpc.aio v2 server calling the
TorchScript model once per request (no batching, no cache).

    python -m bench.baseline_server --model-dir models/digits/2 --port 9001
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import torch

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


async def serve(model_path: str, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(model_path), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="path of a TorchScript file")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    asyncio.run(serve(a.model, a.port, a.threads))


if __name__ == "__main__":
    main()
