"""Request validation against the model config: every mistake is INVALID_ARGUMENT with a
message naming the input and what was expected."""

import numpy as np
import pytest

from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelRepository
from meshserve.common.validation import (
    RequestedOutput,
    WireTensor,
    resolve_outputs,
    validate_inputs,
)


@pytest.fixture(scope="module")
def config(models_dir):
    return ModelRepository(models_dir).config("digits")


def tensor(rows=1, name="input", dtype="FP32", shape=None, data=None):
    shape = shape or (rows, 64)
    if data is None:
        data = np.zeros(shape, np.float32).tobytes()
    return WireTensor(name, dtype, tuple(shape), data)


def test_valid_request_counts_rows(config):
    assert validate_inputs(config, [tensor(5)]) == 5


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "missing input(s) input"),
        ([tensor(), tensor()], "input 'input' is given more than once"),
        ([tensor(), tensor(name="extra")], "unknown input 'extra'"),
        ([tensor(dtype="FP64", data=np.zeros((1, 64)).tobytes())], "datatype FP64, expected FP32"),
        ([tensor(dtype="FLOAT")], "(not a v2 datatype)"),
        ([tensor(shape=(1, 63), data=b"\0" * 252)], "shape [1, 63], expected [-1, 64]"),
        ([tensor(shape=(64,), data=b"\0" * 256)], "shape [64], expected [-1, 64]"),
        ([tensor(shape=(65, 64))], "batch of 65 exceeds max_batch_size 64"),
        ([tensor(shape=(0, 64), data=b"")], "batch dimension is 0"),
        ([tensor(data=b"\0" * 255)], "255 bytes of data, expected 256"),
    ],
)
def test_invalid_inputs(config, inputs, message):
    with pytest.raises(InvalidInput) as e:
        validate_inputs(config, inputs)
    assert message in str(e.value)


def test_outputs_all_by_default_and_in_requested_order(config):
    assert resolve_outputs(config, []) == ["logits", "probabilities", "predictions"]
    requested = [RequestedOutput("predictions"), RequestedOutput("logits")]
    assert resolve_outputs(config, requested) == ["predictions", "logits"]


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ([RequestedOutput("nope")], "unknown requested output 'nope'"),
        ([RequestedOutput("logits"), RequestedOutput("logits")], "requested more than once"),
        ([RequestedOutput("logits", (("classification", 3),))], "classification parameter"),
    ],
)
def test_invalid_outputs(config, requested, message):
    with pytest.raises(InvalidInput) as e:
        resolve_outputs(config, requested)
    assert message in str(e.value)
