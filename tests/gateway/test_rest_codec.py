"""The HTTP/JSON converters (pure) and the routes against the shipped OpenAPI document."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import serialize_byte_tensor

from meshserve.common.errors import InvalidInput
from meshserve.gateway import rest
from meshserve.gateway import rest_codec as codec
from meshserve.pb.inference import grpc_service_pb2 as pb

OPENAPI = Path(rest.__file__).with_name("openapi.json")

NUMERIC = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def sample(dtype) -> np.ndarray:
    if dtype is np.bool_:
        return np.array([[True, False, True], [False, False, True]])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([[info.min, 0, 1], [2, info.max - 1, info.max]], dtype=dtype)
    return np.array([[-1.5, 0.0, 0.25], [3.0, 1e-3, 65504.0]], dtype=dtype)


@pytest.mark.parametrize("name", list(NUMERIC))
def test_every_numeric_datatype_round_trips_flat_and_nested(name):
    x = sample(NUMERIC[name])
    flat = codec.json_to_raw(x.ravel().tolist(), name, [2, 3], "inputs[0]")
    nested = codec.json_to_raw(x.tolist(), name, [2, 3], "inputs[0]")
    assert flat == nested == x.tobytes()
    back = codec.raw_to_json(flat, name)
    assert np.array_equal(np.array(back, dtype=NUMERIC[name]), x.ravel())


def test_bytes_and_bf16_as_triton_serializes_them():
    words = np.array(["héllo", "", "x" * 300], dtype=object)
    raw = codec.json_to_raw(words.tolist(), "BYTES", [3], "inputs[0]")
    assert raw == serialize_byte_tensor(words).item()
    assert codec.raw_to_json(raw, "BYTES") == words.tolist()
    values = np.array([1.0, -2.5, 0.0078125], dtype=np.float32)
    raw = codec.json_to_raw(values.tolist(), "BF16", [3], "inputs[0]")
    assert raw == (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact in bf16
    assert codec.raw_to_json(raw, "BF16") == values.tolist()


@pytest.mark.parametrize(
    ("data", "dtype", "shape", "fragment"),
    [
        ([1.5, 2], "INT32", [2], "INT32 values must be integers"),
        ([300], "UINT8", [1], "out of range for UINT8"),
        ([-1], "UINT32", [1], "out of range for UINT32"),
        ([2**64], "UINT64", [1], "must be integers"),
        ([1, 2**63, 0.5], "UINT64", [3], "must be integers"),
        ([True, False], "INT8", [2], "must be integers"),
        ([1, 0], "BOOL", [2], "BOOL values must be true or false"),
        (["1"], "FP32", [1], "must be numbers"),
        ([None], "FP32", [1], "must be numbers"),
        ([[1, 2], [3]], "FP32", [3], "not a regular array"),
        ([1, 2, 3], "FP32", [2, 2], "3 values, expected 4"),
        ([1], "BYTES", [1], "BYTES values must be strings"),
        (["a"], "BYTES", [2], "1 values, expected 2"),
    ],
)
def test_bad_json_data_is_refused_by_name(data, dtype, shape, fragment):
    with pytest.raises(InvalidInput) as e:
        codec.json_to_raw(data, dtype, shape, "inputs[3]")
    assert str(e.value).startswith("inputs[3].data: ") and fragment in str(e.value)


def test_request_with_binary_and_json_inputs_parameters_and_outputs():
    a = np.arange(4, dtype=np.float32)
    body = {"id": "q", "parameters": {"priority": 1, "timeout": 2**63, "cache": False,
                                      "tag": "t", "ratio": 0.5, "binary_data_output": True},
            "inputs": [{"name": "a", "shape": [4], "datatype": "FP32",
                        "parameters": {"binary_data_size": 16}},
                       {"name": "b", "shape": [2], "datatype": "INT64", "data": [1, 2]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False, "classification": 2}},
                        {"name": "z"}]}
    request, binary, binary_all = codec.infer_request("m", "3", body, memoryview(a.tobytes()))
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "q")
    assert list(request.raw_input_contents) == [a.tobytes(), np.array([1, 2]).tobytes()]
    p = request.parameters
    assert p["priority"].int64_param == 1 and p["timeout"].uint64_param == 2**63
    assert p["cache"].bool_param is False and p["tag"].string_param == "t"
    assert p["ratio"].double_param == 0.5 and "binary_data_output" not in p
    assert [o.name for o in request.outputs] == ["y", "z"]
    assert dict(request.outputs[0].parameters)["classification"].int64_param == 2
    assert "binary_data" not in request.outputs[0].parameters  # HTTP-only: not in cache keys
    assert binary == {"y": False} and binary_all is True


def test_response_binary_and_json_outputs():
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="x")
    y = np.array([[1.0, np.nan], [np.inf, 2.0]], dtype=np.float32)
    z = np.array([7, 8], dtype=np.int64)
    response.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    response.outputs.add(name="z", datatype="INT64", shape=[2])
    response.raw_output_contents.extend([y.tobytes(), z.tobytes()])
    response.parameters["cache_hit"].bool_param = True
    body, length = codec.infer_response(response, {"z": True}, False)
    header = json.loads(body[:length])
    assert body[length:] == z.tobytes()
    assert header["outputs"][0]["data"] == [1.0, None, None, 2.0]  # JSON has no NaN or inf
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert header["parameters"] == {"cache_hit": True} and header["id"] == "x"
    body, length = codec.infer_response(response, {}, False)
    assert length is None and json.loads(body)["outputs"][1]["data"] == [7, 8]


@pytest.mark.parametrize(
    ("body", "length", "fragment"),
    [
        (b'{"a": }', None, "malformed JSON at line 1 column 7 (byte 6)"),
        (b'\xff\xfe', None, "malformed JSON"),
        (b'"x"', None, "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, None, "malformed JSON"),
        (b'{}', "0", "is not within the body"),
        (b'{}', "x" * 500, "'" + "x" * 64 + "...[500 chars]'"),  # quoted, bounded
    ],
)
def test_malformed_bodies(body, length, fragment):
    with pytest.raises(InvalidInput) as e:
        codec.parse_body(body, length)
    assert fragment in str(e.value) and len(str(e.value)) < 300


def test_input_structure_errors_name_the_field():
    def err(body):
        with pytest.raises(InvalidInput) as e:
            codec.infer_request("m", "", body, memoryview(b""))
        return str(e.value)

    x = {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}
    assert err({"inputs": [x, {**x, "name": ""}]}).startswith("inputs[1].name")
    assert err({"inputs": [{**x, "shape": [-1]}]}).startswith("inputs[0].shape")
    assert err({"inputs": [{k: v for k, v in x.items() if k != "data"}]}).startswith(
        "inputs[0]: no data")
    assert err({"inputs": [{**x, "parameters": {"binary_data_size": 4}}]}).startswith(
        "inputs[0]: both data and binary_data_size")
    assert err({"inputs": [x], "id": 5}).startswith("id: expected a string")
    assert err({"inputs": [x], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}) \
        .startswith("outputs[0].parameters.binary_data")
    assert err({"inputs": [x], "parameters": {"p": {"a": 1}}}).startswith("parameters.'p'")
    assert err({"inputs": [x], "parameters": {"p": 2**64}}).startswith("parameters.'p'")


def test_messages_as_triton_writes_them():
    stats = pb.ModelStatisticsResponse()
    s = stats.model_stats.add(name="m", version="1", inference_count=2**40, last_inference=5)
    s.inference_stats.success.count = 3
    s.batch_stats.add(batch_size=4)
    doc = codec.message_json(stats)
    m = doc["model_stats"][0]
    assert m["inference_count"] == 2**40 and m["last_inference"] == 5  # numbers, not strings
    assert m["inference_stats"]["success"] == {"count": 3, "ns": 0}
    assert m["batch_stats"][0]["batch_size"] == 4
    meta = pb.ModelMetadataResponse(name="m")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, 64])
    assert codec.message_json(meta)["inputs"][0]["shape"] == [-1, 64]


def test_routes_match_the_openapi_document():
    served = {(r.method.lower(), r.path) for r in rest.routes(rest.RestApi(None, None, 1))}
    document = json.loads(OPENAPI.read_text())
    described = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert served == described
    for path, ops in document["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), path


def test_every_grpc_status_a_handler_can_raise_has_an_http_status():
    from meshserve.common.errors import ERRORS_BY_CODE_NAME
    from meshserve.common.grpcutil import status_of

    for cls in ERRORS_BY_CODE_NAME.values():
        code = status_of(cls("x"))
        assert code.name == "INTERNAL" or code in rest.STATUS_HTTP, code
