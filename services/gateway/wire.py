"""Counts checked on a large request's bytes before protobuf parses them.

Parsing multiplies some encodings: a packed `shape` of 1-byte varints becomes 8-byte ints
(a 30 MiB message peaked at about 500 MiB here), an empty `inputs` entry (2 bytes) a whole
message object (30 MiB peaked at about 1.3 GiB). convert.check_bounds caps every count, but
only after the parse. So for a message of at least SCAN_FROM bytes the gateway first walks
its fields (field headers and lengths only: a few microseconds, skipping the tensor bytes)
and refuses INVALID_ARGUMENT past the same caps: inputs, outputs, raw contents, parameters,
dimensions, and a tensor's typed contents past the element count of its shape. A smaller
message is parsed directly (at most about 44 x SCAN_FROM of parsed objects). What stays is
the protocol's own: INT64 contents of small values (8 bytes each from 1) within the shape's
element count. Bytes that are not protobuf are left to the parser (its INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Callable

from meshserve.gateway.convert import MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS

SCAN_FROM = 256 * 1024
# Bytes of a packed varint run that end an element (the others have the high bit set).
_CONTINUATION = bytes(range(0x80, 0x100))


class _Malformed(Exception):
    """Not protobuf: the parser answers it."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value start, value end) of each field in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _v, after = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            after = pos + length
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        else:
            raise _Malformed
        if after > end:
            raise _Malformed
        yield key >> 3, wire, pos, after
        pos = after


def _elements(data: bytes, wire: int, start: int, end: int, width: int, room: int) -> int:
    """Elements of one field of a repeated scalar (a packed run holds many); exact when
    they might not fit in `room`."""
    if wire != 2 or width < 0:
        return 1
    if width:
        return (end - start) // width
    if end - start <= room or (end - start) > 10 * room:
        return end - start  # at least one byte a varint, at most ten
    return len(data[start:end].translate(None, _CONTINUATION))


# InferTensorContents: field -> bytes per element when packed (0: varint; -1: not packable)
_CONTENT_WIDTH = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 4, 7: 8, 8: -1}


def _input(data: bytes, start: int, end: int, where: str) -> str | None:
    dims: list[int] = []
    parameters = contents = 0
    contents_at: tuple[int, int] | None = None
    for number, wire, s, e in _fields(data, start, end):
        if number == 3:  # shape
            if wire == 0:
                dims.append(_varint(data, s)[0])
            elif e - s > 10 * MAX_DIMS:
                return f"{where}: more than {MAX_DIMS} dimensions"
            else:
                pos = s
                while pos < e:
                    dim, pos = _varint(data, pos)
                    dims.append(dim)
            if len(dims) > MAX_DIMS:
                return f"{where}: more than {MAX_DIMS} dimensions"
        elif number == 4:
            parameters += 1
            if parameters > MAX_PARAMETERS:
                return f"{where}: more than {MAX_PARAMETERS} parameters"
        elif number == 5 and wire == 2:
            contents_at = (s, e)
    if contents_at is not None:
        size = 1
        for dim in dims:
            size *= max(dim, 0)
        for number, wire, s, e in _fields(data, *contents_at):
            contents += _elements(data, wire, s, e, _CONTENT_WIDTH.get(number, -1),
                                  size - contents)
            if contents > size:
                return (f"{where}: more contents elements than its shape {dims} holds "
                        f"({size})")
    return None


def _output(data: bytes, start: int, end: int, where: str) -> str | None:
    parameters = 0
    for number, *_ in _fields(data, start, end):
        parameters += number == 2
        if parameters > MAX_PARAMETERS:
            return f"{where}: more than {MAX_PARAMETERS} parameters"
    return None


_LIMITS = {4: (MAX_PARAMETERS, "request parameters"), 5: (MAX_TENSORS, "inputs"),
           6: (MAX_TENSORS, "outputs"), 7: (MAX_TENSORS, "raw_input_contents")}


def _infer(data: bytes, start: int, end: int) -> str | None:
    counts = dict.fromkeys(_LIMITS, 0)
    for number, wire, s, e in _fields(data, start, end):
        if number not in counts:
            continue
        counts[number] += 1
        if counts[number] > _LIMITS[number][0]:
            return f"more than {_LIMITS[number][0]} {_LIMITS[number][1]}"
        if number == 5 and wire == 2:
            why = _input(data, s, e, f"input {counts[5] - 1}")
            if why:
                return why
        elif number == 6 and wire == 2:
            why = _output(data, s, e, f"output {counts[6] - 1}")
            if why:
                return why
    return None


def _submit(data: bytes, start: int, end: int) -> str | None:
    for number, wire, s, e in _fields(data, start, end):
        if number == 1 and wire == 2:
            why = _infer(data, s, e)
            if why:
                return why
    return None


def _submit_batch(data: bytes, start: int, end: int) -> str | None:
    for i, (number, wire, s, e) in enumerate(_fields(data, start, end)):
        if number == 1 and wire == 2:
            why = _submit(data, s, e)
            if why:
                return f"request {i}: {why}"
    return None


def _large_only(check: Callable[[bytes, int, int], str | None]) -> Callable[[bytes], str | None]:
    def precheck(data: bytes) -> str | None:
        if len(data) < SCAN_FROM:
            return None
        try:
            return check(data, 0, len(data))
        except _Malformed:
            return None  # the parser says what is wrong
    return precheck


# Method -> a check of its request bytes: why it is refused, or None (grpcutil.new_server).
PRECHECKS: dict[str, Callable[[bytes], str | None]] = {
    "/inference.GRPCInferenceService/ModelInfer": _large_only(_infer),
    "/inference.GRPCInferenceService/ModelStreamInfer": _large_only(_infer),
    "/meshserve.v1.AsyncInference/Submit": _large_only(_submit),
    "/meshserve.v1.AsyncInference/SubmitBatch": _large_only(_submit_batch),
}
