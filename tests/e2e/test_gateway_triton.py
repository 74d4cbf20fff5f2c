"""End to end with Triton's own client: every service in its own process, a real Redis."""

from __future__ import annotations

import asyncio
import queue
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import MODELS

ROWS = np.array(
    [np.arange(64) % 17, (np.arange(64) * 7) % 16, np.full(64, 8)], dtype=np.float32
)


def direct(version: str, x: np.ndarray) -> dict[str, np.ndarray]:
    model = torch.jit.load(str(MODELS / "digits" / version / "model.pt"))
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
    return {
        "logits": logits.numpy(),
        "probabilities": torch.softmax(logits, dim=1).numpy(),
        "predictions": logits.argmax(dim=1).numpy(),
    }


def infer_input(x: np.ndarray, name="input", dtype="FP32") -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return inp


@pytest.fixture(scope="module")
def client(mesh):
    c = tc.InferenceServerClient(mesh.url)
    yield c
    c.close()


def status_of(excinfo) -> str:
    return str(excinfo.value.status())


def test_health_and_server(mesh, client):
    with grpc.insecure_channel(mesh.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    meta = client.get_server_metadata()
    assert meta.name == "meshserve" and "model_repository" in meta.extensions


def test_metadata_and_config(client):
    meta = client.get_model_metadata("digits")
    assert list(meta.versions) == ["1", "2"] and meta.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    config = client.get_model_config("digits").config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [64]
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]


@pytest.mark.parametrize("version", ["1", "2"])
def test_both_versions_match_the_model(client, version):
    result = client.infer("digits", [infer_input(ROWS)], model_version=version,
                          parameters={"cache": False})
    expected = direct(version, ROWS)
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("predictions"), expected["predictions"])
    response = result.get_response()
    assert response.model_version == version
    assert response.parameters["cache_hit"].bool_param is False


def test_default_version_and_requested_outputs_only(client):
    result = client.infer("digits", [infer_input(ROWS[:1])],
                          outputs=[tc.InferRequestedOutput("predictions")])
    response = result.get_response()
    assert response.model_version == "2"
    assert [o.name for o in response.outputs] == ["predictions"]
    assert result.as_numpy("predictions").dtype == np.int64


def test_repeated_request_served_from_cache(client):
    x = ROWS[1:2] + 0.5
    first = client.infer("digits", [infer_input(x)])
    assert first.get_response().parameters["cache_hit"].bool_param is False
    # The gateway stores without delaying its answer: the entry lands shortly after.
    for _ in range(50):
        second = client.infer("digits", [infer_input(x)])
        if second.get_response().parameters["cache_hit"].bool_param:
            break
        time.sleep(0.02)
    assert second.get_response().parameters["cache_hit"].bool_param is True
    np.testing.assert_array_equal(first.as_numpy("logits"), second.as_numpy("logits"))
    np.testing.assert_array_equal(first.as_numpy("predictions"), second.as_numpy("predictions"))
    stats = client.get_inference_statistics("digits", "2").model_stats[0]
    assert stats.inference_stats.cache_hit.count >= 1


def test_statistics_count_inferences_and_batches(client):
    before = client.get_inference_statistics("digits", "1").model_stats[0]
    client.infer("digits", [infer_input(ROWS)], model_version="1", parameters={"cache": False})
    after = client.get_inference_statistics("digits", "1").model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert after.last_inference > 0


def test_stream_inference(client):
    results: list = []
    q: queue.Queue = queue.Queue()  # the callback runs on tritonclient's thread
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        for i in range(5):
            client.async_stream_infer("digits", [infer_input(ROWS[i % 3 : i % 3 + 1])],
                                      request_id=str(i), parameters={"cache": False})
        client.async_stream_infer("nope", [infer_input(ROWS[:1])], request_id="bad")
        for _ in range(6):
            results.append(q.get(timeout=30))
    finally:
        client.stop_stream()
    good = {r.get_response().id: r for r, e in results if e is None}
    errors = [e for r, e in results if e is not None]
    assert sorted(good) == ["0", "1", "2", "3", "4"]
    assert len(errors) == 1 and "unknown model 'nope'" in str(errors[0])
    expected = direct("2", ROWS)["predictions"]
    for rid, r in good.items():
        assert r.as_numpy("predictions")[0] == expected[int(rid) % 3]


def test_repository_index_load_unload(client):
    index = client.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("digits", "1")] == "READY" and states[("digits", "2")] == "READY"
    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [infer_input(ROWS[:1])], parameters={"cache": False})
    assert status_of(e) == "StatusCode.UNAVAILABLE"
    states = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert states[("digits", "2")] == "UNAVAILABLE"
    client.load_model("digits")
    assert client.is_model_ready("digits", "1") and client.is_model_ready("digits", "2")
    result = client.infer("digits", [infer_input(ROWS)], parameters={"cache": False})
    np.testing.assert_array_equal(result.as_numpy("predictions"), direct("2", ROWS)["predictions"])


@pytest.mark.parametrize("name", ["../digits", "/etc/passwd", "digits/../../x", ".."])
def test_load_refuses_paths(client, name):
    with pytest.raises(InferenceServerException) as e:
        client.load_model(name)
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"


def test_load_unknown_model_not_found(client):
    with pytest.raises(InferenceServerException) as e:
        client.load_model("no_such_model")
    assert status_of(e) == "StatusCode.NOT_FOUND"


def _raw(x: np.ndarray, data: bytes) -> tc.InferInput:
    """An input whose raw bytes do not match its shape (tritonclient would not build one)."""
    inp = infer_input(x)
    inp._raw_content = data
    return inp


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment"),
    [
        (dict(model_name="nope"), "NOT_FOUND", "unknown model 'nope'"),
        (dict(model_version="9"), "NOT_FOUND", "no version '9'"),
        (dict(inputs=[]), "INVALID_ARGUMENT", "missing input(s) input"),
        (dict(inputs=[infer_input(ROWS), infer_input(ROWS)]), "INVALID_ARGUMENT",
         "more than once"),
        (dict(inputs=[infer_input(ROWS, name="pixels")]), "INVALID_ARGUMENT", "unknown input 'pixels'"),
        (dict(inputs=[infer_input(ROWS.astype(np.float64), dtype="FP64")]), "INVALID_ARGUMENT",
         "datatype FP64, expected FP32"),
        (dict(inputs=[infer_input(np.zeros((2, 32), np.float32))]), "INVALID_ARGUMENT",
         "shape [2, 32], expected [-1, 64]"),
        (dict(inputs=[_raw(ROWS, b"\0" * 100)]), "INVALID_ARGUMENT", "100 bytes of data, expected 768"),
        (dict(inputs=[infer_input(np.zeros((65, 64), np.float32))]), "INVALID_ARGUMENT",
         "exceeds max_batch_size 64"),
        (dict(outputs=[tc.InferRequestedOutput("nope")]), "INVALID_ARGUMENT",
         "unknown requested output 'nope'"),
        (dict(priority=7), "INVALID_ARGUMENT", "priority 7 is out of range"),
    ],
)
def test_validation_errors(client, kwargs, code, fragment):
    args = dict(model_name="digits", inputs=[infer_input(ROWS)])
    args.update(kwargs)
    with pytest.raises(InferenceServerException) as e:
        client.infer(**args)
    assert status_of(e) == f"StatusCode.{code}"
    assert fragment in e.value.message()


def test_typed_contents_accepted(mesh):
    """Inputs in InferTensorContents (not raw) are accepted too."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(mesh.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="digits")
        t = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        t.contents.fp32_contents.extend(ROWS[0].tolist())
        response = stub.ModelInfer(request, timeout=30)
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_allclose(logits, direct("2", ROWS[:1])["logits"][0], rtol=1e-5, atol=1e-5)


def test_one_millisecond_deadline(client):
    # 0.1 ms: a whole mesh round trip can now take under 1 ms on an idle machine.
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [infer_input(np.random.rand(64, 64).astype(np.float32))],
                     client_timeout=0.0001, parameters={"cache": False})
    assert status_of(e) == "StatusCode.DEADLINE_EXCEEDED"


def test_timeout_parameter_expires_in_queue(client):
    """Triton's `timeout` parameter (microseconds) bounds the time in the mesh."""
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [infer_input(ROWS)], parameters={"cache": False}, timeout=1)
    assert status_of(e) == "StatusCode.DEADLINE_EXCEEDED"


def test_64_concurrent_clients(mesh):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 17, size=(256, 64)).astype(np.float32)
    expected = direct("2", data)["predictions"]

    async def run():
        clients = [tca.InferenceServerClient(mesh.url) for _ in range(64)]
        wrong = 0
        done = 0
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 3

        async def worker(k: int):
            nonlocal wrong, done
            i = k
            while loop.time() < stop_at:
                x = data[i % 256 : i % 256 + 1]
                inp = tca.InferInput("input", [1, 64], "FP32")
                inp.set_data_from_numpy(x)
                r = await clients[k].infer("digits", [inp], parameters={"cache": False})
                wrong += int(r.as_numpy("predictions")[0] != expected[i % 256])
                done += 1
                i += 64

        try:
            await asyncio.gather(*(worker(k) for k in range(64)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return wrong, done

    wrong, done = asyncio.run(run())
    assert done >= 64 and wrong == 0
