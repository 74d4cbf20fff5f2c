"""A model worker and a batcher shared by the module, and gateways started per test with
their protection flags (each its own process, as Kubernetes runs them)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from meshserve.common import auth
from meshserve.pb.inference import grpc_service_pb2 as pb
from tests.conftest import MODELS, ServiceProcess

INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
X = (np.arange(64, dtype=np.float32) % 16).reshape(1, 64)


class Backend:
    def __init__(self, tmp):
        self.tmp = tmp
        self.worker = ServiceProcess("model_worker", [*INTERNAL, "--device", "cpu",
                                                      "--model-repository", str(MODELS)], tmp)
        self.worker.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *INTERNAL, "--model-repository", str(MODELS), "--load", "digits",
            "--workers", self.worker.address], tmp)
        self.batcher.wait_ready()

    def stop(self):
        self.batcher.stop()
        self.worker.stop()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = Backend(tmp_path_factory.mktemp("backend"))
    yield b
    b.stop()


@pytest.fixture
def start_gateway(backend, tmp_path):
    started: list[ServiceProcess] = []

    def start(*flags: str, wait: bool = True) -> ServiceProcess:
        proc = ServiceProcess("gateway", [
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--model-repository", str(MODELS), "--batcher", backend.batcher.address,
            *flags], tmp_path)
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def write_keys(path, *entries: dict) -> None:
    """entries: {"name", "key" (in clear: hashed here), "models", ...}."""
    keys = []
    for e in entries:
        e = dict(e)
        e["sha256"] = auth.hash_key(e.pop("key"))
        keys.append(e)
    path.write_text(json.dumps({"keys": keys}))


def infer_request(model: str = "digits", request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.tobytes())
    request.parameters["cache"].bool_param = False
    return request


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def metric(gateway: ServiceProcess, name: str, labels: str = "") -> float:
    """A sample of the gateway's Prometheus page (0 when absent)."""
    url = f"http://127.0.0.1:{gateway.ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0
