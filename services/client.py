"""A small Python client for meshserve's gateway over our generated stubs, and the
`meshserve infer` command. (Triton's `tritonclient.grpc` works unchanged too.)

    async with AsyncClient("127.0.0.1:8001") as client:
        result = await client.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        result.outputs["predictions"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from meshserve.common.grpcutil import MiB, channel_options
from meshserve.common.tensors import raw_bytes, to_numpy
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc


@dataclass(frozen=True, slots=True)
class InferResult:
    model_version: str
    outputs: dict[str, np.ndarray]
    cache_hit: bool
    queue_us: int
    compute_us: int


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:8001", max_message_mb: int = 64):
        self.channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_mb * MiB))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        use_cache: bool = True,
        request_id: str = "",
    ) -> InferResult:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            dtype, shape, data = raw_bytes(np.asarray(array))
            request.inputs.add(name=name, datatype=dtype, shape=shape)
            request.raw_input_contents.append(data)
        for name in outputs:
            request.outputs.add(name=name)
        if priority:
            request.parameters["priority"].int64_param = priority
        if not use_cache:
            request.parameters["cache"].bool_param = False
        response = await self.stub.ModelInfer(request, timeout=timeout_s)
        arrays = {
            t.name: to_numpy(t.name, t.datatype, t.shape, raw)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        p = response.parameters
        return InferResult(
            response.model_version, arrays, p["cache_hit"].bool_param,
            p["queue_us"].int64_param, p["compute_us"].int64_param,
        )

    async def server_ready(self) -> bool:
        return (await self.stub.ServerReady(pb.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self.stub.ModelReady(pb.ModelReadyRequest(name=model, version=version))).ready

    async def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version))

    async def config(self, model: str, version: str = ""):
        return (await self.stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version))).config

    async def statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self.stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version=version)
        )

    async def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        return await self.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready_only))

    async def load_model(self, model: str, versions: Sequence[str] = (),
                         default_version: str | None = None) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if versions:
            request.parameters["versions"].string_param = ",".join(versions)
        if default_version is not None:
            request.parameters["default_version"].string_param = default_version
        await self.stub.RepositoryModelLoad(request)

    async def unload_model(self, model: str) -> None:
        await self.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model))


# ------------------------------------------------------------------- meshserve infer


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshserve infer", description="One inference request.")
    p.add_argument("model")
    p.add_argument("--url", default="127.0.0.1:8001", help="gateway address")
    p.add_argument("--version", default="", help="model version (default: the model's default)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help='JSON: a list for a one-input model, or {"name": list}')
    source.add_argument("--input-file", help="a JSON file in the --input format")
    p.add_argument("--output", action="append", default=[], help="output to return (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="skip the prediction cache")
    p.add_argument("--timeout-s", type=float, default=10.0)
    return p.parse_args(argv)


async def _infer(args: argparse.Namespace) -> int:
    text = Path(args.input_file).read_text() if args.input_file else args.input
    data = json.loads(text)
    async with AsyncClient(args.url) as client:
        meta = await client.metadata(args.model, args.version)
        if not isinstance(data, dict):
            if len(meta.inputs) != 1:
                names = ", ".join(t.name for t in meta.inputs)
                print(f"model '{args.model}' has inputs {names}: give a JSON object", file=sys.stderr)
                return 2
            data = {meta.inputs[0].name: data}
        inputs = {}
        for spec in meta.inputs:
            if spec.name not in data:
                continue
            array = np.asarray(data[spec.name], dtype=to_numpy_dtype(spec.datatype))
            if len(spec.shape) == array.ndim + 1:  # one row given: add the batch dimension
                array = array[None]
            inputs[spec.name] = array
        for name in data:
            if name not in inputs:
                inputs[name] = np.asarray(data[name])  # let the gateway name what is wrong
        result = await client.infer(args.model, inputs, args.output, args.version,
                                    timeout_s=args.timeout_s, use_cache=not args.no_cache)
    print(f"model {args.model} version {result.model_version}  cache_hit={result.cache_hit} "
          f"queue_us={result.queue_us} compute_us={result.compute_us}")
    for name, array in result.outputs.items():
        values = np.array2string(array, precision=4, suppress_small=True, max_line_width=100)
        print(f"{name} {array.dtype} {list(array.shape)}:\n{values}")
    return 0


def to_numpy_dtype(datatype: str):
    from meshserve.common.datatypes import datatype as lookup

    return lookup(datatype).numpy


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        return asyncio.run(_infer(args))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
