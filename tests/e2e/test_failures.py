"""Parts of the mesh going away: clear statuses at the gateway, never a crash or a hang."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Mesh


def infer(client, rows: np.ndarray, **kwargs):
    inp = tc.InferInput("input", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows)
    return client.infer("digits", [inp], parameters={"cache": False}, client_timeout=30, **kwargs)


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    yield m
    m.stop()


def test_all_workers_gone_then_batcher_gone(mesh):
    client = tc.InferenceServerClient(mesh.url)
    x = np.zeros((1, 64), np.float32)
    assert infer(client, x).as_numpy("predictions").shape == (1,)

    mesh.workers[0].kill()
    with pytest.raises(InferenceServerException) as e:
        infer(client, x)
    assert str(e.value.status()) == "StatusCode.UNAVAILABLE"
    assert "digits" in e.value.message()

    mesh.batcher.kill()
    with pytest.raises(InferenceServerException) as e:
        infer(client, x)
    assert str(e.value.status()) == "StatusCode.UNAVAILABLE"
    assert "batcher" in e.value.message()
    # The gateway itself keeps answering what it can without the batcher.
    assert client.is_server_live()
    assert not client.is_server_ready()
    assert client.get_model_metadata("digits").name == "digits"
    client.close()


def test_message_over_the_size_limit_is_refused_clearly(mesh, tmp_path):
    from tests.conftest import MODELS, ServiceProcess

    small = ServiceProcess("gateway", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--max-message-mb", "1",
        "--model-repository", str(MODELS), "--batcher", mesh.batcher.address], tmp_path)
    try:
        small.wait_ready()
        client = tc.InferenceServerClient(small.address)
        with pytest.raises(InferenceServerException) as e:
            infer(client, np.zeros((64 * 65, 64), np.float32))  # 1.06 MB of input
        assert str(e.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in e.value.message()
        assert infer(client, np.zeros((2, 64), np.float32)).as_numpy("predictions").shape == (2,)
        client.close()
    finally:
        small.stop()
