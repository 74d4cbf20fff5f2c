"""Validation of inference inputs against the model's config, shared by the gateway (per
request) and the model worker (per batch). Pure: no grpc, no protobuf.

Every error names the input (or output) and what was expected, and is an InvalidInput
(INVALID_ARGUMENT): a client's mistake is never INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.common.datatypes import DATATYPES, byte_size
from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelConfig


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as it travels (a request's input, a batch's input or output): datatype,
    full shape, little-endian row-major bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    # Canonical (sorted) parameters, part of the cache key.
    parameters: tuple[tuple[str, object], ...] = ()


def _expected_shape(config: ModelConfig, dims: Sequence[int]) -> str:
    body = ", ".join(str(d) for d in dims)
    if config.max_batch_size > 0:
        return f"[-1{', ' if body else ''}{body}] (batch of at most {config.max_batch_size})"
    return f"[{body}]"


def validate_inputs(config: ModelConfig, inputs: Sequence[WireTensor]) -> int:
    """Checks names, datatypes, shapes and byte sizes. Returns the request's rows
    (1 when the model does not batch)."""
    seen: set[str] = set()
    rows: int | None = None
    rows_from = ""
    for tensor in inputs:
        spec = config.input(tensor.name)
        if spec is None:
            expected = ", ".join(t.name for t in config.inputs)
            raise InvalidInput(
                f"unknown input '{tensor.name}' for model '{config.name}'; expected {expected}"
            )
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            known = "" if tensor.datatype in DATATYPES else " (not a v2 datatype)"
            raise InvalidInput(
                f"input '{tensor.name}': datatype {tensor.datatype}{known}, "
                f"expected {spec.datatype}"
            )
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{tensor.name}': shape {list(shape)} has a negative dimension")
        if config.max_batch_size > 0:
            if not shape or not spec.matches(shape[1:]):
                raise InvalidInput(
                    f"input '{tensor.name}': shape {list(shape)}, expected "
                    f"{_expected_shape(config, spec.dims)}"
                )
            n = shape[0]
            if n < 1:
                raise InvalidInput(f"input '{tensor.name}': batch dimension is 0")
            if n > config.max_batch_size:
                raise InvalidInput(
                    f"input '{tensor.name}': batch of {n} exceeds max_batch_size "
                    f"{config.max_batch_size} of model '{config.name}'"
                )
            if rows is not None and n != rows:
                raise InvalidInput(
                    f"input '{tensor.name}': batch of {n} rows, but input '{rows_from}' has {rows}"
                )
            rows, rows_from = n, tensor.name
        elif not spec.matches(shape):
            raise InvalidInput(
                f"input '{tensor.name}': shape {list(shape)}, expected "
                f"{_expected_shape(config, spec.dims)}"
            )
        expected_bytes = byte_size(tensor.datatype, shape)
        if len(tensor.data) != expected_bytes:
            raise InvalidInput(
                f"input '{tensor.name}': {len(tensor.data)} bytes of data, expected "
                f"{expected_bytes} for {tensor.datatype} of shape {list(shape)}"
            )
    missing = [t.name for t in config.inputs if t.name not in seen]
    if missing:
        raise InvalidInput(f"missing input(s) {', '.join(missing)} for model '{config.name}'")
    return rows or 1


def resolve_outputs(config: ModelConfig, requested: Sequence[RequestedOutput]) -> list[str]:
    """The output names to return, in the order requested; all of them when none is named."""
    if not requested:
        return [t.name for t in config.outputs]
    names: list[str] = []
    for out in requested:
        if config.output(out.name) is None:
            expected = ", ".join(t.name for t in config.outputs)
            raise InvalidInput(
                f"unknown requested output '{out.name}' for model '{config.name}'; "
                f"expected one of {expected}"
            )
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested more than once")
        for key, _value in out.parameters:
            if key == "classification":
                raise InvalidInput(
                    f"output '{out.name}': the classification parameter is not supported; "
                    "declare top-k outputs in the model's classifier config instead"
                )
        names.append(out.name)
    return names
