"""Request digests: the cache key of one inference request.

Pure: no grpc, no protobuf. The gateway imports `request_digest` and sends
CacheKey{model, version, digest}. Every field is length-prefixed, inputs are taken
in name order and output parameters are encoded canonically (typed, sorted), so
equal requests give equal digests and different ones never collide by a split.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from meshserve.common.errors import InvalidInput

DIGEST_BYTES = 32
_DOMAIN = b"meshserve.cache.request.v1"
_FLOATS = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}

InputSpec = tuple[str, str, Sequence[int], "bytes | np.ndarray"]
OutputSpec = tuple[str, Mapping[str, object]]


def request_digest(
    model: str,
    version: str,
    inputs: Sequence[InputSpec],
    outputs: Sequence[OutputSpec],
    hash_precision: int | None = None,
) -> bytes:
    """blake2b-256 over model, resolved version, inputs (sorted by name: name, datatype,
    shape, raw bytes) and requested outputs with their parameters (sorted by name).

    With hash_precision, FP16/FP32/FP64 inputs are rounded to that many decimals
    (-0.0 becomes 0.0, every NaN the same NaN) before hashing."""
    if hash_precision is not None and hash_precision < 0:
        raise InvalidInput(f"hash_precision must be >= 0, got {hash_precision}")
    h = _prefix(model, version).copy()
    ordered = sorted(inputs, key=lambda spec: spec[0]) if len(inputs) > 1 else inputs
    h.update(_pack_q(len(ordered)))
    for name, datatype, shape, data in ordered:
        _field(h, name.encode())
        _field(h, datatype.encode())
        dims = [int(d) for d in shape]
        _field(h, struct.pack(f"<{len(dims)}q", *dims))
        _field(h, _input_bytes(datatype, data, hash_precision))
    named = sorted(outputs, key=lambda spec: spec[0]) if len(outputs) > 1 else outputs
    h.update(_pack_q(len(named)))
    for name, parameters in named:
        _field(h, name.encode())
        _field(h, _encode_value(dict(parameters)) if parameters else _NO_PARAMETERS)
    return h.digest()


@functools.lru_cache(maxsize=1024)
def _prefix(model: str, version: str):
    """The hash state after the domain, model and version (copied per request)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    _field(h, _DOMAIN)
    _field(h, model.encode())
    _field(h, version.encode())
    return h


_pack_q = struct.Struct("<Q").pack


def _field(h, data: bytes) -> None:
    h.update(_pack_q(len(data)))
    h.update(data)


def _input_bytes(datatype: str, data: bytes | np.ndarray, hash_precision: int | None) -> bytes:
    float_dtype = _FLOATS.get(datatype)
    if isinstance(data, np.ndarray):
        if data.dtype == np.object_:
            raise InvalidInput("object arrays cannot be hashed: pass BYTES tensors as raw bytes")
        array = data.astype(float_dtype or data.dtype.newbyteorder("<"), copy=False)
    elif isinstance(data, bytes | bytearray | memoryview):
        if float_dtype is None or hash_precision is None:
            return bytes(data)
        if len(data) % float_dtype.itemsize:
            raise InvalidInput(f"{datatype} data of {len(data)} bytes is not whole elements")
        array = np.frombuffer(data, dtype=float_dtype)
    else:
        raise InvalidInput(f"input data must be bytes or a numpy array, not {type(data).__name__}")
    if float_dtype is not None and hash_precision is not None:
        rounded = np.round(array, hash_precision) + float_dtype.type(0.0)  # -0.0 + 0.0 = 0.0
        array = np.where(np.isnan(rounded), float_dtype.type(np.nan), rounded).astype(float_dtype)
    return np.ascontiguousarray(array).tobytes()


def _encode_value(value: object) -> bytes:
    """A typed, order-independent encoding of parameter values (no repr, no pickle)."""
    if value is None:
        return b"n"
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | np.integer):
        return b"i" + str(int(value)).encode()
    if isinstance(value, float | np.floating):
        return b"d" + float(value).hex().encode()
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, bytes | bytearray):
        return b"b" + bytes(value)
    if isinstance(value, Mapping):
        items = sorted(((str(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        parts = [b"m", struct.pack("<Q", len(items))]
        for k, v in items:
            for part in (k.encode(), _encode_value(v)):
                parts += [struct.pack("<Q", len(part)), part]
        return b"".join(parts)
    if isinstance(value, list | tuple):
        parts = [b"l", struct.pack("<Q", len(value))]
        for v in value:
            part = _encode_value(v)
            parts += [struct.pack("<Q", len(part)), part]
        return b"".join(parts)
    raise InvalidInput(f"unsupported output parameter type {type(value).__name__}")


_NO_PARAMETERS = _encode_value({})
