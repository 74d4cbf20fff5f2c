"""The whole mesh over mTLS (TLS on the gateway): a TLS client is answered; plaintext
clients and clients without a certificate are refused where they must be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc
from tests.conftest import MODELS

X = np.stack([np.arange(64) % 17, (np.arange(64) * 5) % 16]).astype(np.float32)


def expected_predictions(x: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(MODELS / "digits" / "2" / "model.pt"))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).argmax(dim=1).numpy()


def infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="digits", model_version="2",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                       shape=list(x.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="predictions")],
        raw_input_contents=[x.tobytes()],
    )


def predictions(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.int64)


def credentials(certs, client_cert: bool) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(), private_key=certs.key.read_bytes(),
        certificate_chain=certs.cert.read_bytes())


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10).status


def test_tls_client_is_answered_through_the_mtls_mesh(tls_mesh, certs):
    with grpc.secure_channel(tls_mesh.gateway.address, credentials(certs, False)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer(infer_request(X), timeout=30)
        # The gateway stores without delaying its answer: the entry lands shortly after.
        for _ in range(50):
            second = stub.ModelInfer(infer_request(X), timeout=30)
            if second.parameters["cache_hit"].bool_param:
                break
            time.sleep(0.02)
    np.testing.assert_array_equal(predictions(first), expected_predictions(X))
    np.testing.assert_array_equal(predictions(second), expected_predictions(X))
    # The second answer came from the cache: the gateway -> cache hop works over mTLS too.
    assert not first.parameters["cache_hit"].bool_param
    assert second.parameters["cache_hit"].bool_param


def test_plaintext_client_is_refused_by_the_gateway(tls_mesh):
    with grpc.insecure_channel(tls_mesh.gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(infer_request(X), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["batcher", "cache", "worker"])
def test_plaintext_client_is_refused_by_an_internal_service(tls_mesh, service):
    with grpc.insecure_channel(getattr(tls_mesh, service).address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            health(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_internal_service_requires_a_client_certificate(tls_mesh, certs):
    address = tls_mesh.cache.address
    with grpc.secure_channel(address, credentials(certs, False)) as channel:
        with pytest.raises(grpc.RpcError) as e:
            cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.StatsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # The same call with a certificate the CA signed is served.
    with grpc.secure_channel(address, credentials(certs, True)) as channel:
        stats = cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.StatsRequest(), timeout=10)
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert stats.backend == "memory"


def test_exec_probe_checks_health_over_mtls(tls_mesh, certs):
    """The probe the mtls Kubernetes component runs (the kubelet's grpc probe is plaintext)."""
    port = tls_mesh.worker.address.rsplit(":", 1)[1]
    probe = [sys.executable, "-m", "meshserve.common.healthcheck", "--port", port,
             "--server-name", "meshserve-worker"]
    env = {**os.environ, "MESHSERVE_TLS_CERT": str(certs.cert),
           "MESHSERVE_TLS_KEY": str(certs.key), "MESHSERVE_TLS_CA": str(certs.ca)}
    assert subprocess.run(probe, env=env, timeout=60).returncode == 0
    no_cert = {k: v for k, v in env.items() if k not in ("MESHSERVE_TLS_CERT", "MESHSERVE_TLS_KEY")}
    failed = subprocess.run(probe, env=no_cert, timeout=60, capture_output=True, text=True)
    assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr


def test_every_client_command_reaches_the_tls_gateway(tls_mesh, certs, tmp_path):
    """infer, submit, result and route take the same connection flags (here --tls-ca)."""
    example = tmp_path / "x.json"
    example.write_text(json.dumps(X[0].tolist()))
    flags = ["--url", tls_mesh.gateway.address, "--tls-ca", str(certs.ca)]

    def meshserve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meshserve.cli", *args], capture_output=True,
                              text=True, timeout=120)

    expected = f"predictions int64 [1]:\n[{expected_predictions(X[:1])[0]}]"
    infer = meshserve("infer", "digits", "--version", "2", "--input-file", str(example), *flags)
    assert infer.returncode == 0 and expected in infer.stdout, infer.stderr
    submit = meshserve("submit", "digits", "--version", "2", "--input-file", str(example),
                       "--output", "predictions", *flags)
    assert submit.returncode == 0, submit.stderr
    result = meshserve("result", submit.stdout.strip(), "--wait", *flags)
    assert result.returncode == 0 and "SUCCEEDED" in result.stdout, result.stderr
    assert expected in result.stdout
    route = meshserve("route", "get", "digits", *flags)
    assert route.returncode == 0 and "digits: no routing policy" in route.stdout, route.stderr
    # without the CA the same command fails with a gRPC status, not a traceback
    refused = meshserve("route", "get", "digits", "--url", tls_mesh.gateway.address)
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAVAILABLE")
