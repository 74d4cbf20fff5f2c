"""Requests of different shapes through the real mesh (gateway -> batcher -> worker, each
its own process): models/seqpool takes FP32 [-1, -1, 4] and pools over the variable length.
Every answer must equal what the model computes for that request alone, in-process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca

from tests.conftest import MODELS

LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34]


def direct(x: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(MODELS / "seqpool" / "1" / "model.pt"))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def seqpool(mesh):
    with tc.InferenceServerClient(mesh.url) as c:
        c.load_model("seqpool")
        assert c.is_model_ready("seqpool")
        yield c


def test_metadata_declares_the_variable_length(seqpool):
    meta = seqpool.get_model_metadata("seqpool")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("tokens", "FP32", [-1, -1, 4])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("pooled", [-1, 8])]


def test_concurrent_requests_of_different_lengths_answered_as_the_model_computes(mesh, seqpool):
    rng = np.random.default_rng(13)
    # Rounds of every length, shuffled so requests of each length queue between others;
    # some requests carry 2 sequences (2 rows) of their length.
    requests = [
        rng.standard_normal((1 + (i % 3 == 0), length, 4)).astype(np.float32)
        for i, length in enumerate(LENGTHS * 8)
    ]
    rng.shuffle(requests)
    before = seqpool.get_inference_statistics("seqpool", "1").model_stats[0]

    async def run() -> list[np.ndarray]:
        clients = [tca.InferenceServerClient(mesh.url) for _ in range(8)]

        async def one(i: int, x: np.ndarray) -> np.ndarray:
            inp = tca.InferInput("tokens", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = await clients[i % len(clients)].infer(
                "seqpool", [inp], parameters={"cache": False})
            return result.as_numpy("pooled")

        try:
            return await asyncio.gather(*(one(i, x) for i, x in enumerate(requests)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    answers = asyncio.run(run())
    for x, got in zip(requests, answers, strict=True):
        assert got.shape == (x.shape[0], 8)
        # Batched matmuls may differ from the lone call in the last bit (float32 rounding);
        # a row of another request, or another length, is off by far more.
        np.testing.assert_allclose(got, direct(x), rtol=1e-6, atol=1e-6,
                                   err_msg=f"request of shape {x.shape}")
    after = seqpool.get_inference_statistics("seqpool", "1").model_stats[0]
    rows = sum(x.shape[0] for x in requests)
    assert after.inference_count - before.inference_count == rows
    # Requests of one length were joined (fewer executions than requests), never others.
    assert after.execution_count - before.execution_count < len(requests)


def test_zero_length_sequence(seqpool):
    x = np.zeros((1, 0, 4), np.float32)
    inp = tc.InferInput("tokens", [1, 0, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = seqpool.infer("seqpool", [inp], parameters={"cache": False})
    np.testing.assert_array_equal(result.as_numpy("pooled"), np.zeros((1, 8), np.float32))
