"""Open Inference Protocol datatypes and their numpy/torch equivalents."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meshserve.common.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class DataType:
    name: str
    itemsize: int  # bytes per element; 0 for BYTES (variable length)
    numpy: np.dtype | None
    torch: torch.dtype | None
    triton_enum: int  # inference.DataType (TYPE_*) value


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        DataType("BOOL", 1, np.dtype(np.bool_), torch.bool, 1),
        DataType("UINT8", 1, np.dtype("u1"), torch.uint8, 2),
        DataType("UINT16", 2, np.dtype("<u2"), torch.uint16, 3),
        DataType("UINT32", 4, np.dtype("<u4"), torch.uint32, 4),
        DataType("UINT64", 8, np.dtype("<u8"), torch.uint64, 5),
        DataType("INT8", 1, np.dtype("i1"), torch.int8, 6),
        DataType("INT16", 2, np.dtype("<i2"), torch.int16, 7),
        DataType("INT32", 4, np.dtype("<i4"), torch.int32, 8),
        DataType("INT64", 8, np.dtype("<i8"), torch.int64, 9),
        DataType("FP16", 2, np.dtype("<f2"), torch.float16, 10),
        DataType("FP32", 4, np.dtype("<f4"), torch.float32, 11),
        DataType("FP64", 8, np.dtype("<f8"), torch.float64, 12),
        DataType("BYTES", 0, np.dtype(np.object_), None, 13),
        # numpy has no bfloat16: BF16 tensors travel raw and become torch tensors directly.
        DataType("BF16", 2, None, torch.bfloat16, 14),
    )
}

TRITON_ENUM_TO_NAME = {d.triton_enum: d.name for d in DATATYPES.values()}
_BY_NUMPY = {d.numpy: d.name for d in DATATYPES.values() if d.numpy is not None and d.itemsize}
_BY_TORCH = {d.torch: d.name for d in DATATYPES.values() if d.torch is not None}


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
        return _BY_TORCH[dtype]
    except KeyError:
        raise InvalidInput(f"torch dtype {dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def byte_size(name: str, shape: Sequence[int]) -> int:
    """Bytes of a fixed-size tensor; BYTES tensors have no fixed size."""
    return datatype(name).itemsize * element_count(shape)
