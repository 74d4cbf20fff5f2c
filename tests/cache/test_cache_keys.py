"""request_digest: canonical, collision-resistant by construction, precision merging."""

import numpy as np
import pytest

from meshserve.cache.keys import DIGEST_BYTES, request_digest
from meshserve.common.errors import InvalidInput

X = np.arange(6, dtype="<f4").reshape(2, 3)
IDS = np.array([1, 2, 3], dtype="<i8")


def inputs(**over):
    base = {"x": ("x", "FP32", [2, 3], X.tobytes()), "ids": ("ids", "INT64", [3], IDS.tobytes())}
    base.update(over)
    return list(base.values())


def digest(inputs_=None, outputs=None, model="digits", version="1", **kw):
    return request_digest(model, version, inputs() if inputs_ is None else inputs_,
                          [("logits", {})] if outputs is None else outputs, **kw)


def test_digest_is_32_bytes_and_stable():
    assert len(digest()) == DIGEST_BYTES
    assert digest() == digest()


def test_input_and_output_order_is_irrelevant():
    assert digest(inputs()) == digest(list(reversed(inputs())))
    a = digest(outputs=[("logits", {"a": 1, "b": "x"}), ("probabilities", {})])
    b = digest(outputs=[("probabilities", {}), ("logits", {"b": "x", "a": 1})])
    assert a == b


def test_numpy_array_and_raw_bytes_agree():
    as_array = inputs(x=("x", "FP32", [2, 3], X))
    assert digest(as_array) == digest()


@pytest.mark.parametrize("changed", [
    dict(model="digits2"),
    dict(version="2"),
    dict(inputs_=inputs(x=("x2", "FP32", [2, 3], X.tobytes()))),
    dict(inputs_=inputs(x=("x", "INT32", [2, 3], X.tobytes()))),
    dict(inputs_=inputs(x=("x", "FP32", [3, 2], X.tobytes()))),
    dict(inputs_=inputs(x=("x", "FP32", [2, 3], (X + 1).tobytes()))),
    dict(inputs_=inputs()[:1]),
    dict(outputs=[("probabilities", {})]),
    dict(outputs=[]),
    dict(outputs=[("logits", {"classification": 3})]),
    dict(outputs=[("logits", {"classification": "3"})]),
    dict(outputs=[("logits", {"classification": 3.0})]),
    dict(outputs=[("logits", {"flag": True})]),
    dict(outputs=[("logits", {}), ("predictions", {})]),
])
def test_any_change_changes_the_digest(changed):
    assert digest(**changed) != digest()


def test_length_prefixes_prevent_split_collisions():
    a = request_digest("ab", "c", [], [])
    b = request_digest("a", "bc", [], [])
    assert a != b
    one = [("x", "UINT8", [2], b"\x01\x02")]
    two = [("x", "UINT8", [1], b"\x01"), ("y", "UINT8", [1], b"\x02")]
    assert request_digest("m", "1", one, []) != request_digest("m", "1", two, [])


def test_hash_precision_merges_near_equal_floats():
    near = X + np.float32(1e-6)
    plain = inputs(x=("x", "FP32", [2, 3], near.tobytes()))
    assert digest(plain) != digest()
    assert digest(plain, hash_precision=3) == digest(hash_precision=3)
    # different enough values stay apart
    far = inputs(x=("x", "FP32", [2, 3], (X + np.float32(0.01)).tobytes()))
    assert digest(far, hash_precision=3) != digest(hash_precision=3)
    # -0.0 and 0.0 hash the same once rounded; FP64 and FP16 too
    for dtype, name in (("<f8", "FP64"), ("<f2", "FP16")):
        neg = np.array([-0.0, -0.0001], dtype=dtype)
        pos = np.array([0.0, 0.0], dtype=dtype)
        d = [request_digest("m", "1", [("x", name, [2], v.tobytes())], [], hash_precision=2)
             for v in (neg, pos)]
        assert d[0] == d[1]
    # integers are never rounded
    ints = inputs(ids=("ids", "INT64", [3], (IDS + 1).tobytes()))
    assert digest(ints, hash_precision=0) != digest(hash_precision=0)


def test_unsupported_values_are_rejected():
    with pytest.raises(InvalidInput):
        digest(outputs=[("logits", {"x": object()})])
    with pytest.raises(InvalidInput):
        digest(inputs_=[("s", "BYTES", [1], np.array([b"a"], dtype=object))])
    with pytest.raises(InvalidInput):
        digest(hash_precision=-1)
