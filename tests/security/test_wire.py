"""A large request's counts checked on its bytes before protobuf parses them (parsing turns
a 1-byte varint into an 8-byte int and a 2-byte empty entry into a message object)."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.gateway.wire import PRECHECKS, SCAN_FROM
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb

INFER = PRECHECKS["/inference.GRPCInferenceService/ModelInfer"]
SUBMIT_BATCH = PRECHECKS["/meshserve.v1.AsyncInference/SubmitBatch"]


def request(rows: int = SCAN_FROM // 256) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="digits", id="x")
    r.parameters["cache"].bool_param = False
    t = r.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    t.parameters["p"].int64_param = 1
    r.outputs.add(name="output")
    r.raw_input_contents.append(np.zeros((rows, 64), np.float32).tobytes())
    return r


def test_legitimate_large_requests_pass():
    assert len(request().SerializeToString()) >= SCAN_FROM
    assert INFER(request().SerializeToString()) is None
    typed = pb.ModelInferRequest(model_name="m")
    values = list(range(200_000))
    typed.inputs.add(name="ids", datatype="INT64", shape=[1, len(values)]).contents.int64_contents[:] = values
    typed.inputs.add(name="f", datatype="FP32", shape=[len(values)]).contents.fp32_contents[:] = values
    texts = typed.inputs.add(name="t", datatype="BYTES", shape=[4096])
    texts.contents.bytes_contents[:] = [b"x" * 16] * 4096
    assert INFER(typed.SerializeToString()) is None
    batch = apb.SubmitBatchRequest(requests=[apb.SubmitRequest(request=request())] * 3)
    assert SUBMIT_BATCH(batch.SerializeToString()) is None


def bombs() -> dict[str, bytes]:
    out = {}
    r = request()
    r.inputs[0].shape[:] = [1] * 300_000  # packed: 1 byte each
    out["dims"] = r.SerializeToString()
    r = request()
    r.inputs.extend([pb.ModelInferRequest.InferInputTensor()] * 200_000)
    out["inputs"] = r.SerializeToString()
    r = request()
    r.outputs.extend([pb.ModelInferRequest.InferRequestedOutputTensor()] * 200_000)
    out["outputs"] = r.SerializeToString()
    r = request()
    r.raw_input_contents.extend([b""] * 200_000)
    out["raw"] = r.SerializeToString()
    r = request()
    for i in range(50_000):
        r.parameters[str(i)].bool_param = True
    out["parameters"] = r.SerializeToString()
    r = request()
    for i in range(50_000):
        r.inputs[0].parameters[str(i)].bool_param = True
    out["input parameters"] = r.SerializeToString()
    r = request()
    for i in range(50_000):
        r.outputs[0].parameters[str(i)].bool_param = True
    out["output parameters"] = r.SerializeToString()
    r = pb.ModelInferRequest(model_name="m")
    r.inputs.add(name="ids", datatype="INT64", shape=[2]).contents.int64_contents[:] = [1] * SCAN_FROM
    out["contents"] = r.SerializeToString()
    r = pb.ModelInferRequest(model_name="m")
    r.inputs.add(name="t", datatype="BYTES", shape=[2]).contents.bytes_contents[:] = [b""] * SCAN_FROM
    out["bytes contents"] = r.SerializeToString()
    return out


@pytest.mark.parametrize("what", bombs())
def test_amplifying_requests_are_refused_before_parsing(what):
    data = bombs()[what]
    assert len(data) >= SCAN_FROM
    why = INFER(data)
    assert why and len(why) < 200, what
    batch = apb.SubmitBatchRequest(requests=[apb.SubmitRequest(request=request()),
                                             apb.SubmitRequest(request=pb.ModelInferRequest.FromString(data))])
    assert SUBMIT_BATCH(batch.SerializeToString()).startswith("request 1: ")


def test_small_or_malformed_bytes_are_left_to_the_parser():
    small = request(rows=4)
    small.inputs[0].shape[:] = [1] * 1000
    assert INFER(small.SerializeToString()) is None  # parsed, then check_bounds refuses it
    assert INFER(b"\xff" * SCAN_FROM) is None
    assert INFER(b"\x2a\xff\xff\xff\x7f" + b"\0" * SCAN_FROM) is None  # length past the end
