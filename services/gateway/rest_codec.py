"""Pure converters between the v2 protocol's HTTP/JSON form and its protobuf messages.

An HTTP inference request becomes the same pb.ModelInferRequest a gRPC client sends (every
input in raw_input_contents), so both transports share one path behind it; the response
message becomes JSON, with Triton's binary tensor data extension for the outputs that ask
for it. Tensors are converted with numpy (BYTES elements excepted: they are strings).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch
from google.protobuf import descriptor, json_format

from meshserve.common.datatypes import DATATYPES, element_count
from meshserve.common.errors import InvalidInput
from meshserve.common.logs import clip
from meshserve.pb.inference import grpc_service_pb2 as pb

# Triton's binary tensor data extension.
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"  # input/output parameter: its bytes follow the JSON header
BINARY_OUTPUT = "binary_data"  # requested output parameter: answer this output in binary
BINARY_ALL = "binary_data_output"  # request parameter: every output in binary by default

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
_LENGTH = struct.Struct("<I")
_SHOWN = 64  # characters of a client's string quoted in an error, at most


def shown(text: object) -> str:
    """A client-supplied string as it may appear in a message: quoted and bounded."""
    return repr(clip(text, _SHOWN))


# --------------------------------------------------------------------------- request


def parse_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON header, the binary data after it). header_length is the value of
    Inference-Header-Content-Length (None: the whole body is JSON)."""
    binary = memoryview(b"")
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {shown(header_length)} is not an integer") from None
        if not 0 < n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {n} is not within the body's {len(body)} bytes")
        binary = memoryview(body)[n:]
        body = body[:n]
    return parse_json(body), binary


def parse_json(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except UnicodeDecodeError as e:
        raise InvalidInput(f"malformed JSON: not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON at line {e.lineno} column {e.colno} "
                           f"(byte {e.pos}): {e.msg}") from None
    except RecursionError:
        raise InvalidInput("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def set_param(target: pb.InferParameter, value: object, where: str) -> None:
    """A JSON parameter value into an InferParameter (bool, int64/uint64, double, string)."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if -INT64_MAX - 1 <= value <= INT64_MAX:
            target.int64_param = value
        elif 0 <= value <= UINT64_MAX:
            target.uint64_param = value
        else:
            raise InvalidInput(f"{where}: {value} does not fit in 64 bits")
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInput(f"{where}: expected a bool, number or string, got {type(value).__name__}")


def _params(obj: dict, where: str) -> dict:
    value = obj.get("parameters", {})
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}.parameters: expected an object, got {type(value).__name__}")
    return value


def _shape(tensor: dict, where: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= INT64_MAX for d in shape):
        raise InvalidInput(f"{where}.shape: expected an array of non-negative integers")
    return shape


def json_to_raw(data: object, dtype: str, shape: list[int], where: str) -> bytes:
    """`data` (flat or nested JSON array, or one scalar) as the raw little-endian bytes of
    `dtype`; values of the wrong kind or out of range are refused, never cast."""
    count = element_count(shape)
    if dtype == "BYTES":
        items = np.asarray(data, dtype=object).ravel() if isinstance(data, list) else [data]
        if len(items) != count:
            raise InvalidInput(f"{where}.data: {len(items)} values, expected {count} for shape {shape}")
        out = bytearray()
        for item in items:
            if not isinstance(item, str):
                raise InvalidInput(f"{where}.data: BYTES values must be strings "
                                   f"(send other bytes as binary data), got {type(item).__name__}")
            b = item.encode()
            out += _LENGTH.pack(len(b))
            out += b
        return bytes(out)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{where}.data: not a regular array of numbers") from None
    if dtype == "UINT64" and array.dtype.kind in "fO":
        array = _uint64(data, where)  # values past int64 made numpy fall back to float
    if array.size != count:
        raise InvalidInput(f"{where}.data: {array.size} values, expected {count} for shape {shape}")
    kind = array.dtype.kind
    if dtype == "BOOL":
        if kind != "b" and count:
            raise InvalidInput(f"{where}.data: BOOL values must be true or false")
        return array.astype(np.bool_).tobytes()
    if not count:
        array = array.astype(np.float64)
        kind = "f"
    dt = DATATYPES[dtype]
    is_float = dtype in ("FP16", "FP32", "FP64", "BF16")
    if kind not in ("iu" + ("f" if is_float else "")):
        expected = "numbers" if is_float else "integers"
        raise InvalidInput(f"{where}.data: {dtype} values must be {expected}")
    if dtype == "BF16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16) \
            .view(torch.int16).numpy().tobytes()
    if not is_float and count:
        info = np.iinfo(dt.numpy)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"{where}.data: a value is out of range for {dtype}")
    return array.astype(dt.numpy).tobytes()


def _uint64(data: object, where: str) -> np.ndarray:
    flat = np.asarray(data, dtype=object).ravel()
    if not all(type(v) is int and 0 <= v <= UINT64_MAX for v in flat):
        raise InvalidInput(f"{where}.data: UINT64 values must be integers in range")
    return flat.astype(np.uint64)


def infer_request(model: str, version: str, body: dict,
                  binary: memoryview) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """The ModelInferRequest of an HTTP body, plus how its outputs are to be answered:
    {output: binary?} for those with a `binary_data` parameter, and the default for the
    others (the request's `binary_data_output` parameter)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    rid = body.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInput(f"id: expected a string, got {type(rid).__name__}")
    request.id = rid
    binary_all = False
    for key, value in _params(body, "request").items():
        if key == BINARY_ALL:
            if not isinstance(value, bool):
                raise InvalidInput(f"parameters.{BINARY_ALL}: expected a bool")
            binary_all = value
            continue
        set_param(request.parameters[key], value, f"parameters.{shown(key)}")

    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs: expected a non-empty array of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{where}: expected an object")
        name, dtype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name: expected a non-empty string")
        if dtype not in DATATYPES:
            raise InvalidInput(f"{where}.datatype: {shown(dtype)} is not a v2 datatype "
                               f"(expected one of {', '.join(DATATYPES)})")
        shape = _shape(tensor, where)
        t = request.inputs.add(name=name, datatype=dtype, shape=shape)
        size = None
        for key, value in _params(tensor, where).items():
            if key == BINARY_SIZE:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidInput(f"{where}.parameters.{BINARY_SIZE}: expected a byte count")
                size = value
            else:
                set_param(t.parameters[key], value, f"{where}.parameters.{shown(key)}")
        if size is not None:
            if "data" in tensor:
                raise InvalidInput(f"{where}: both data and {BINARY_SIZE} are given")
            if offset + size > len(binary):
                raise InvalidInput(f"{where}.parameters.{BINARY_SIZE}: {size} bytes from byte "
                                   f"{offset} overrun the {len(binary)} bytes of binary data")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(json_to_raw(tensor["data"], dtype, shape, where))
        else:
            raise InvalidInput(f"{where}: no data (give data, or binary data and "
                               f"parameters.{BINARY_SIZE})")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the inputs that "
                           f"name them ({HEADER_LENGTH} or {BINARY_SIZE} is wrong)")

    binary_outputs: dict[str, bool] = {}
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("outputs: expected an array")
    for i, out in enumerate(outputs):
        where = f"outputs[{i}]"
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput(f"{where}: expected an object with a name")
        o = request.outputs.add(name=out["name"])
        for key, value in _params(out, where).items():
            if key == BINARY_OUTPUT:
                if not isinstance(value, bool):
                    raise InvalidInput(f"{where}.parameters.{BINARY_OUTPUT}: expected a bool")
                binary_outputs[o.name] = value
            else:
                set_param(o.parameters[key], value, f"{where}.parameters.{shown(key)}")
    return request, binary_outputs, binary_all


# -------------------------------------------------------------------------- response


def raw_to_json(data: bytes, dtype: str) -> list:
    """Raw little-endian bytes as a flat JSON array."""
    if dtype == "BYTES":
        items, at = [], 0
        while at < len(data):
            (n,) = _LENGTH.unpack_from(data, at)
            items.append(bytes(data[at + 4:at + 4 + n]).decode(errors="replace"))
            at += 4 + n
        return items
    if dtype == "BF16":
        return torch.frombuffer(bytearray(data), dtype=torch.bfloat16).float().tolist()
    values = np.frombuffer(data, dtype=DATATYPES[dtype].numpy).tolist()
    if dtype in ("FP16", "FP32", "FP64") and not all(map(math.isfinite, values)):
        # JSON has no NaN or infinity: null, as Triton's JSON writer does.
        values = [v if math.isfinite(v) else None for v in values]
    return values


def param_json(p: pb.InferParameter) -> object:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def infer_response(response: pb.ModelInferResponse, binary_outputs: Mapping[str, bool],
                   binary_all: bool) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary data follows it, else None)."""
    outputs, chunks = [], []
    for i, t in enumerate(response.outputs):
        data = response.raw_output_contents[i]
        out = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: param_json(v) for k, v in t.parameters.items()}
        if binary_outputs.get(t.name, binary_all):
            params[BINARY_SIZE] = len(data)
            chunks.append(data)
        else:
            out["data"] = raw_to_json(data, t.datatype)
        if params:
            out["parameters"] = params
        outputs.append(out)
    doc = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {k: param_json(v) for k, v in response.parameters.items()}
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


# --------------------------------------------------------------- other messages


def message_json(message) -> dict:
    """A protobuf message as Triton's HTTP API writes it: proto field names, enum names,
    64-bit integers as JSON numbers (json_format writes them as strings)."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, doc)


_INT64 = (descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64)


def _numbers(desc, doc: dict) -> dict:
    for name, value in doc.items():
        field = desc.fields_by_name.get(name)
        if field is None:
            continue
        if field.cpp_type in _INT64:
            doc[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            mt = field.message_type
            if mt.GetOptions().map_entry:
                vf = mt.fields_by_name["value"]
                if vf.message_type is not None:
                    for v in value.values():
                        _numbers(vf.message_type, v)
                elif vf.cpp_type in _INT64:
                    doc[name] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for v in value:
                    _numbers(mt, v)
            elif isinstance(value, dict):
                _numbers(mt, value)
    return doc


def repository_parameters(body: dict, target: Mapping) -> None:
    """Load/unload `parameters` into a map of ModelRepositoryParameter."""
    for key, value in _params(body, "request").items():
        p = target[key]
        where = f"parameters.{shown(key)}"
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if not -INT64_MAX - 1 <= value <= INT64_MAX:
                raise InvalidInput(f"{where}: {value} does not fit in 64 bits")
            p.int64_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidInput(f"{where}: expected a bool, integer or string")
