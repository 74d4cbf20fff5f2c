"""RepositoryModelLoad of a loaded version reloads its files from disk, through the real
mesh (gateway -> batcher -> worker, each its own process), while clients keep sending:
answers switch to the new weights, no request fails, and the cache never serves an answer
of the previous weights afterwards."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as tca

from tests.conftest import MODELS
from tests.e2e.conftest import Mesh

ROWS = np.array(
    [np.arange(64) % 17, (np.arange(64) * 7) % 16, np.full(64, 8)], dtype=np.float32
)


def logits_of(path, x: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(path))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture
def repo_mesh(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "digits", repo / "digits")
    mesh = Mesh(tmp_path, models=repo)
    yield repo, mesh
    mesh.stop()


def infer_input(x: np.ndarray) -> tca.InferInput:
    inp = tca.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def matches(got: np.ndarray, expected: np.ndarray) -> bool:
    return np.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reload_with_new_weights_under_load(repo_mesh):
    repo, mesh = repo_mesh
    old = logits_of(MODELS / "digits" / "2" / "model.pt", ROWS)
    # The new weights: another network with the same interface (version 1's file).
    new_file = MODELS / "digits" / "1" / "model.pt"
    new = logits_of(new_file, ROWS)
    assert not matches(old, new)
    cached = ROWS[1:2] + 0.25

    async def run():
        client = tca.InferenceServerClient(mesh.url)
        senders = [tca.InferenceServerClient(mesh.url) for _ in range(6)]
        # (sent, answered, logits or error), counted in events of the reload: 0 before the
        # load call, 1 during it, 2 after it returned.
        results: list[tuple[int, int, object]] = []
        phase = 0
        enough = {0: asyncio.Event(), 2: asyncio.Event()}  # 20 answers sent in that phase
        stop = False

        async def send(c: tca.InferenceServerClient) -> None:
            while not stop:
                sent = phase
                try:
                    r = await c.infer("digits", [infer_input(ROWS)], model_version="2",
                                      parameters={"cache": False})
                    results.append((sent, phase, r.as_numpy("logits")))
                except Exception as e:  # noqa: BLE001 - recorded, asserted below
                    results.append((sent, phase, e))
                if sent in enough and sum(1 for s, _, _ in results if s == sent) >= 20:
                    enough[sent].set()

        async def cache_hit(x: np.ndarray):
            for _ in range(100):
                r = await client.infer("digits", [infer_input(x)], model_version="2")
                if r.get_response().parameters["cache_hit"].bool_param:
                    return r
                await asyncio.sleep(0.02)
            raise AssertionError("never a cache hit")

        try:
            first = await cache_hit(cached)  # an answer of the old weights, in the cache
            tasks = [asyncio.ensure_future(send(c)) for c in senders]
            await enough[0].wait()
            shutil.copyfile(new_file, repo / "digits" / "2" / "model.pt")
            phase = 1
            await client.load_model("digits")
            phase = 2
            await enough[2].wait()
            stop = True
            await asyncio.gather(*tasks)
            after = await client.infer("digits", [infer_input(cached)], model_version="2")
            return first, after, results
        finally:
            await asyncio.gather(client.close(), *(c.close() for c in senders))

    first, after, results = asyncio.run(run())
    errors = [r for _, _, r in results if isinstance(r, Exception)]
    assert errors == []
    for sent, answered, logits in results:
        if answered == 0:
            assert matches(logits, old)
        elif sent == 2:
            assert matches(logits, new)
        else:  # in flight across the swap: one or the other, never a mix
            assert matches(logits, old) or matches(logits, new)
    assert sum(1 for s, _, _ in results if s == 2) >= 20
    # The cached answer of the old weights is never served after the reload.
    assert not after.get_response().parameters["cache_hit"].bool_param
    assert matches(first.as_numpy("logits"), logits_of(MODELS / "digits" / "2" / "model.pt",
                                                       ROWS[1:2] + 0.25))
    assert matches(after.as_numpy("logits"), logits_of(new_file, ROWS[1:2] + 0.25))
