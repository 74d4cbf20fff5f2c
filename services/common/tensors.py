"""Converters between raw tensor bytes, numpy arrays, torch tensors and meshserve.v1.Tensor.

Tensors cross every hop as raw row-major little-endian bytes; these helpers are the only
place that turns bytes into arrays and back, always without per-element Python work.
torch is imported only by the torch helpers (a client working in numpy never loads it).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from meshserve.common.datatypes import byte_size, datatype, from_numpy, from_torch
from meshserve.common.errors import InvalidInput
from meshserve.pb.meshserve.v1 import tensor_pb2

if TYPE_CHECKING:
    import torch

# Arrays over received bytes are read-only views; we never write to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def check_raw_size(name: str, dtype: str, shape: Sequence[int], data: bytes) -> None:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    expected = byte_size(dtype, shape)
    if len(data) != expected:
        raise InvalidInput(
            f"input '{name}': {len(data)} bytes of raw data, expected {expected} "
            f"for {dtype} of shape {list(shape)}"
        )


def to_numpy(name: str, dtype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    dt = datatype(dtype)
    if dt.numpy is None or dt.itemsize == 0:
        raise InvalidInput(f"input '{name}': datatype {dtype} cannot be read as a numpy array")
    check_raw_size(name, dtype, shape, data)
    return np.frombuffer(data, dtype=dt.numpy).reshape(tuple(shape))


def to_torch(name: str, dtype: str, shape: Sequence[int], data: bytes) -> torch.Tensor:
    import torch

    dt = datatype(dtype)
    if dt.torch is None:
        raise InvalidInput(f"input '{name}': datatype {dtype} cannot be read as a torch tensor")
    check_raw_size(name, dtype, shape, data)
    if not data:
        return torch.empty(tuple(shape), dtype=dt.torch)
    return torch.frombuffer(data, dtype=dt.torch).reshape(tuple(shape))


def raw_bytes(array: np.ndarray | torch.Tensor) -> tuple[str, list[int], bytes]:
    """(datatype, shape, little-endian row-major bytes) of an array or tensor."""
    torch = sys.modules.get("torch")  # not imported: array cannot be a torch tensor
    if torch is not None and isinstance(array, torch.Tensor):
        dtype = from_torch(array.dtype)
        t = array.detach().to("cpu").contiguous()
        shape = list(t.shape)
        if t.dtype == torch.bfloat16:
            return dtype, shape, t.view(torch.int16).numpy().tobytes()
        return dtype, shape, t.numpy().tobytes()
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return from_numpy(arr.dtype), list(arr.shape), arr.tobytes()


def to_pb(name: str, array: np.ndarray | torch.Tensor) -> tensor_pb2.Tensor:
    dtype, shape, data = raw_bytes(array)
    return tensor_pb2.Tensor(name=name, datatype=dtype, shape=shape, data=data)


def from_pb(tensor: tensor_pb2.Tensor) -> np.ndarray:
    return to_numpy(tensor.name, tensor.datatype, tensor.shape, tensor.data)


def torch_from_pb(tensor: tensor_pb2.Tensor) -> torch.Tensor:
    return to_torch(tensor.name, tensor.datatype, tensor.shape, tensor.data)
