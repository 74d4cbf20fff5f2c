"""Open Inference Protocol datatypes and their numpy/torch equivalents.

torch is imported on first use of a torch dtype only: clients (the CLI) never load it."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshserve.common.errors import InvalidInput

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class DataType:
    name: str
    itemsize: int  # bytes per element; 0 for BYTES (variable length)
    numpy: np.dtype | None
    torch_name: str | None  # the torch dtype's name in the torch module
    triton_enum: int  # inference.DataType (TYPE_*) value

    @property
    def torch(self) -> torch.dtype | None:
        return None if self.torch_name is None else _torch_dtype(self.torch_name)


@functools.cache
def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        DataType("BOOL", 1, np.dtype(np.bool_), "bool", 1),
        DataType("UINT8", 1, np.dtype("u1"), "uint8", 2),
        DataType("UINT16", 2, np.dtype("<u2"), "uint16", 3),
        DataType("UINT32", 4, np.dtype("<u4"), "uint32", 4),
        DataType("UINT64", 8, np.dtype("<u8"), "uint64", 5),
        DataType("INT8", 1, np.dtype("i1"), "int8", 6),
        DataType("INT16", 2, np.dtype("<i2"), "int16", 7),
        DataType("INT32", 4, np.dtype("<i4"), "int32", 8),
        DataType("INT64", 8, np.dtype("<i8"), "int64", 9),
        DataType("FP16", 2, np.dtype("<f2"), "float16", 10),
        DataType("FP32", 4, np.dtype("<f4"), "float32", 11),
        DataType("FP64", 8, np.dtype("<f8"), "float64", 12),
        DataType("BYTES", 0, np.dtype(np.object_), None, 13),
        # numpy has no bfloat16: BF16 tensors travel raw and become torch tensors directly.
        DataType("BF16", 2, None, "bfloat16", 14),
    )
}

TRITON_ENUM_TO_NAME = {d.triton_enum: d.name for d in DATATYPES.values()}
_BY_NUMPY = {d.numpy: d.name for d in DATATYPES.values() if d.numpy is not None and d.itemsize}


@functools.cache
def _by_torch() -> dict:
    return {d.torch: d.name for d in DATATYPES.values() if d.torch_name is not None}


def datatype(name: str) -> DataType:
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown datatype '{name}'; expected one of {', '.join(DATATYPES)}"
        ) from None


def from_numpy(dtype: np.dtype) -> str:
    try:
        return _BY_NUMPY[np.dtype(dtype).newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _by_torch()[dtype]
    except KeyError:
        raise InvalidInput(f"torch dtype {dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def byte_size(name: str, shape: Sequence[int]) -> int:
    """Bytes of a fixed-size tensor; BYTES tensors have no fixed size."""
    return datatype(name).itemsize * element_count(shape)
