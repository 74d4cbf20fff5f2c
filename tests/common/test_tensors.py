"""Raw-bytes round trips of services/common/tensors.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshserve.common import tensors
from meshserve.common.datatypes import DATATYPES
from meshserve.common.errors import InvalidInput

NUMPY_TYPES = [n for n, d in DATATYPES.items() if d.numpy is not None and d.itemsize]


@pytest.mark.parametrize("name", NUMPY_TYPES)
def test_numpy_round_trip_for_each_datatype(name):
    dt = DATATYPES[name]
    array = (np.arange(12) % 2 == 1) if name == "BOOL" else np.arange(12).astype(dt.numpy)
    array = array.reshape(3, 4)
    pb = tensors.to_pb("t", array)
    assert pb.datatype == name and list(pb.shape) == [3, 4]
    assert len(pb.data) == 12 * dt.itemsize
    back = tensors.from_pb(pb)
    assert back.dtype == dt.numpy and np.array_equal(back, array)
    as_torch = tensors.torch_from_pb(pb)
    assert as_torch.dtype == dt.torch and np.array_equal(as_torch.numpy(), array)


def test_bytes_are_little_endian_row_major():
    dtype, shape, data = tensors.raw_bytes(np.array([[1, 2], [3, 4]], dtype=">i4"))
    assert (dtype, shape) == ("INT32", [2, 2])
    assert data == np.array([1, 2, 3, 4], "<i4").tobytes()
    _, _, col_major = tensors.raw_bytes(np.asfortranarray(np.array([[1, 2], [3, 4]], "<i2")))
    assert col_major == np.array([1, 2, 3, 4], "<i2").tobytes()


def test_bf16_round_trips_through_torch():
    t = torch.tensor([[1.5, -2.0], [0.25, 3.0e38]], dtype=torch.bfloat16)
    pb = tensors.to_pb("b", t)
    assert pb.datatype == "BF16" and len(pb.data) == 8
    back = tensors.torch_from_pb(pb)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    with pytest.raises(InvalidInput, match="cannot be read as a numpy array"):
        tensors.from_pb(pb)


def test_size_mismatch_names_the_input_and_the_expected_size():
    with pytest.raises(InvalidInput, match="input 'x': 12 bytes of raw data, expected 16 for "
                                           r"FP32 of shape \[2, 2\]"):
        tensors.to_numpy("x", "FP32", [2, 2], b"\0" * 12)
    with pytest.raises(InvalidInput, match="negative dimension"):
        tensors.to_torch("x", "FP32", [-1, 2], b"")
    with pytest.raises(InvalidInput, match="unknown datatype 'FP8'"):
        tensors.to_numpy("x", "FP8", [1], b"\0")


def test_empty_tensor_round_trip():
    back = tensors.to_torch("e", "FP32", [0, 3], b"")
    assert back.shape == (0, 3)
