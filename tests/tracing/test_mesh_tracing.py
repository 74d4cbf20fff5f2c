"""A traceparent across the whole mesh (every service its own process), and gzip on every
hop: sampled requests leave a `trace=<id>` line in every service, unsampled ones none."""

from __future__ import annotations

import os
import re
import time

import grpc
import numpy as np
import pytest
import torch

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import MODELS, ServiceProcess

GZIP = ["--compression", "gzip", "--channel-compression", "gzip"]


class GzipMesh:
    """Plaintext; every server answers gzip-compressed and every channel between the
    services sends gzip. The gateway logs grpc's compression trace."""

    def __init__(self, tmp):
        internal = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *GZIP]
        self.cache = ServiceProcess("cache", internal, tmp)
        self.worker = ServiceProcess("model_worker", [
            *internal, "--device", "cpu", "--model-repository", str(MODELS)], tmp)
        self.cache.wait_ready()
        self.worker.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *internal, "--model-repository", str(MODELS), "--load", "digits",
            "--workers", self.worker.address], tmp)
        self.batcher.wait_ready()
        self.gateway = ServiceProcess("gateway", [
            *internal, "--model-repository", str(MODELS), "--batcher", self.batcher.address,
            "--cache", self.cache.address], tmp,
            env={"GRPC_TRACE": "compression", "GRPC_VERBOSITY": "debug"})
        self.gateway.wait_ready()
        self.services = {"gateway": self.gateway, "cache": self.cache,
                         "batcher": self.batcher, "worker": self.worker}

    def logs(self) -> dict[str, str]:
        return {name: p.log_path.read_text(errors="replace") for name, p in self.services.items()}

    def stop(self) -> None:
        for proc in (self.gateway, self.batcher, self.worker, self.cache):
            proc.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = GzipMesh(tmp_path_factory.mktemp("gzip-mesh"))
    yield m
    m.stop()


def request(x: np.ndarray, outputs=("predictions",)) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="digits", model_version="2",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                       shape=list(x.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[x.tobytes()],
    )


def direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = torch.jit.load(str(MODELS / "digits" / "2" / "model.pt"))
    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
    return logits.numpy(), logits.argmax(dim=1).numpy()


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float32)


def new_trace_id() -> str:
    return os.urandom(16).hex()


def wait_for(mesh: GzipMesh, trace_id: str, services: list[str], timeout_s: float = 20) -> dict:
    """The services' logs once each has a line with trace_id (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = mesh.logs()
        if all(f"trace={trace_id}" in logs[s] for s in services) or time.monotonic() > deadline:
            return logs
        time.sleep(0.1)


def test_sampled_traceparent_is_in_every_services_log(mesh):
    trace_id = new_trace_id()
    x = rows(3, 1)
    with grpc.insecure_channel(mesh.gateway.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request(x), timeout=30,
            metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], np.int64), direct(x)[1])
    logs = wait_for(mesh, trace_id, ["gateway", "cache", "batcher", "worker"])
    for service, text in logs.items():
        lines = [line for line in text.splitlines() if f"trace={trace_id}" in line]
        assert lines, f"{service} logged nothing for trace {trace_id}"
    assert re.search(rf"trace={trace_id} cache lookup digits version 2: miss", logs["cache"])
    assert re.search(rf"trace={trace_id} batcher answered request \d+ for digits version 2: OK",
                     logs["batcher"])
    assert re.search(rf"trace={trace_id} worker computed batch \d+ of digits version 2 \(3 rows\)",
                     logs["worker"])
    assert re.search(rf"trace={trace_id} ModelInfer digits version 2: OK", logs["gateway"])


def test_unsampled_requests_leave_no_per_request_lines(mesh):
    unsampled = new_trace_id()
    before = {s: t.count("trace=") for s, t in mesh.logs().items()}
    with grpc.insecure_channel(mesh.gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request(rows(2, 2)), timeout=30,
                        metadata=[("traceparent", f"00-{unsampled}-00f067aa0ba902b7-00")])
        stub.ModelInfer(request(rows(2, 3)), timeout=30)  # none: sampled at ratio 0
        # Then a sampled request: once its lines are everywhere, the others' would be too.
        marker = new_trace_id()
        stub.ModelInfer(request(rows(2, 4)), timeout=30,
                        metadata=[("traceparent", f"00-{marker}-00f067aa0ba902b7-01")])
    logs = wait_for(mesh, marker, ["gateway", "cache", "batcher", "worker"])
    for service, text in logs.items():
        assert f"trace={unsampled}" not in text, service
        marked = text.count(f"trace={marker}")
        assert marked >= 1, service
        assert text.count("trace=") - before[service] == marked, service


def test_errors_are_logged_with_their_trace_even_unsampled(mesh):
    trace_id = new_trace_id()
    with grpc.insecure_channel(mesh.gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request(rows(1, 5)).__class__(model_name="no_such_model"), timeout=30,
                metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-00")])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    logs = wait_for(mesh, trace_id, ["gateway"])
    assert re.search(rf"WARNING .* trace={trace_id} ModelInfer no_such_model .*NOT_FOUND",
                     logs["gateway"])


def test_gzip_client_and_gzip_responses(mesh):
    """A client sending gzip is understood; the gateway's large answers go out gzipped
    (its grpc compression trace shows a compressed message), and a plain client reads them."""
    x = rows(64, 6)
    logits, predictions = direct(x)
    for compression in (grpc.Compression.Gzip, grpc.Compression.NoCompression):
        with grpc.insecure_channel(mesh.gateway.address, compression=compression) as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request(x, ("logits", "predictions")), timeout=30)
        got = dict(zip([o.name for o in response.outputs], response.raw_output_contents,
                       strict=True))
        np.testing.assert_allclose(np.frombuffer(got["logits"], np.float32).reshape(64, 10),
                                   logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.frombuffer(got["predictions"], np.int64), predictions)
    trace = mesh.gateway.log_path.read_text(errors="replace")
    assert re.search(r"Compressed\[gzip\] \d+ bytes vs\. \d+ bytes", trace)  # sent gzipped
    assert re.search(r"DecompressMessage: len=\d+ .*alg=2", trace)  # received gzipped
