"""Client errors across real processes: bytes that are not protobuf, a repository with a
broken model, Triton's sequence parameters, metric labels a client cannot mint."""

from __future__ import annotations

import json
import shutil
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from meshserve.common.grpcutil import _reflection_pool
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import MODELS, RedisServer, ServiceProcess

INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no message parses from it


def _repository(root):
    """digits, plus `typo` (a config with a typo'd key) and `nofile` (a torchscript model
    whose only version folder holds a .pth file)."""
    shutil.copytree(MODELS / "digits", root / "digits")
    config = json.loads((MODELS / "digits" / "config.json").read_text())
    typo = {**config, "name": "typo", "max_batch_sise": 8}
    (root / "typo").mkdir()
    (root / "typo" / "config.json").write_text(json.dumps(typo))
    (root / "nofile" / "1").mkdir(parents=True)
    (root / "nofile" / "config.json").write_text(json.dumps({**config, "name": "nofile"}))
    (root / "nofile" / "1" / "model.pth").write_bytes(b"not a model")
    return root


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    repo = str(_repository(tmp / "repo"))
    redis = RedisServer(tmp)
    redis.start()
    procs = {}
    try:
        procs["cache"] = ServiceProcess("cache", [*INTERNAL, "--redis-url", redis.url], tmp)
        procs["worker"] = ServiceProcess("model_worker", [
            *INTERNAL, "--device", "cpu", "--model-repository", repo], tmp)
        procs["cache"].wait_ready()
        procs["worker"].wait_ready()
        # --load all with two broken models: the batcher starts and loads digits.
        procs["batcher"] = ServiceProcess("batcher", [
            *INTERNAL, "--model-repository", repo, "--load", "all",
            "--workers", procs["worker"].address], tmp)
        procs["batcher"].wait_ready()
        procs["gateway"] = ServiceProcess("gateway", [
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--model-repository", repo, "--batcher", procs["batcher"].address,
            "--cache", procs["cache"].address], tmp)
        procs["tasks"] = ServiceProcess("tasks", [
            *INTERNAL, "--redis-url", redis.url, "--model-repository", repo,
            "--batcher", procs["batcher"].address], tmp)
        procs["gateway"].wait_ready()
        procs["tasks"].wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        redis.stop()


def _pool():
    """Our descriptor pool with every proto of every service loaded."""
    import importlib
    import pkgutil

    import meshserve.pb.meshserve.v1 as v1

    for module in pkgutil.iter_modules(v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"{v1.__name__}.{module.name}")
    return _reflection_pool()


def _services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    return [s.name for s in reply.list_services_response.service]


def _send_garbage(channel, path: str, method) -> grpc.RpcError:
    if method.client_streaming:
        call = (channel.stream_stream if method.server_streaming else channel.stream_unary)(path)
        request = iter([GARBAGE])
    else:
        call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
        request = GARBAGE
    with pytest.raises(grpc.RpcError) as e:
        result = call(request, timeout=30)
        if method.server_streaming:
            list(result)
    return e.value


@pytest.mark.parametrize("service", ["gateway", "batcher", "worker", "cache", "tasks"])
def test_undecodable_bytes_are_invalid_argument_on_every_method(mesh, service):
    pool = _pool()
    with grpc.insecure_channel(mesh[service].address) as channel:
        names = _services(channel)
        assert "grpc.health.v1.Health" in names
        answers = {}
        for name in names:
            for method in pool.FindServiceByName(name).methods:
                error = _send_garbage(channel, f"/{name}/{method.name}", method)
                answers[f"{name}/{method.name}"] = (error.code(), error.details())
        live = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=30)
    wrong = {m: a for m, a in answers.items() if a[0] != grpc.StatusCode.INVALID_ARGUMENT
             or "not a valid protobuf message" not in a[1]}
    assert not wrong, wrong
    assert live == b"\x08\x01"  # SERVING: the service still answers


def test_typo_in_a_config_is_a_client_error_naming_file_and_field(mesh):
    client = tc.InferenceServerClient(mesh["gateway"].address)
    with pytest.raises(InferenceServerException) as e:
        client.load_model("typo")
    assert str(e.value.status()) == "StatusCode.FAILED_PRECONDITION"
    assert "typo/config.json: max_batch_sise: unknown field" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("typo", [_input(1)])
    assert "max_batch_sise" in e.value.message()

    # The rest of the repository serves; the broken model is in the index with its reason.
    assert client.is_server_ready()
    index = {(m["name"], m.get("version", "")): m
             for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index[("typo", "")]["state"] == "UNAVAILABLE"
    assert "max_batch_sise" in index[("typo", "")]["reason"]
    assert index[("digits", "2")]["state"] == "READY"
    assert index[("nofile", "")]["state"] == "UNAVAILABLE"
    assert "needs the file 'model.pt'" in index[("nofile", "")]["reason"]
    assert client.infer("digits", [_input(2)]).as_numpy("predictions").shape == (2,)
    client.close()


def test_version_folder_without_the_model_file_fails_the_load_naming_it(mesh):
    with grpc.insecure_channel(mesh["gateway"].address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for versions in ("", "1"):
            request = pb.RepositoryModelLoadRequest(model_name="nofile")
            if versions:
                request.parameters["versions"].string_param = versions
            with pytest.raises(grpc.RpcError) as e:
                stub.RepositoryModelLoad(request, timeout=60)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "needs the file 'model.pt'" in e.value.details()
            assert "1/ holds model.pth" in e.value.details()


def test_sequence_parameters_are_refused(mesh):
    client = tc.InferenceServerClient(mesh["gateway"].address)
    for kwargs in ({"sequence_id": 7, "sequence_start": True}, {"sequence_id": 7}):
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [_input(1)], **kwargs)
        assert str(e.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert "sequence batching is not supported" in e.value.message()
    # Other parameters are ignored.
    result = client.infer("digits", [_input(1)], parameters={"my_tag": "x"})
    assert result.as_numpy("predictions").shape == (1,)
    client.close()


def test_metric_labels_never_take_a_made_up_model_name(mesh):
    client = tc.InferenceServerClient(mesh["gateway"].address)
    minted = ["made-up-model-1234", "bad/../name", "x" * 300]
    for name in minted:
        with pytest.raises(InferenceServerException):
            client.infer(name, [_input(1)])
    assert client.infer("digits", [_input(1)]).as_numpy("predictions").shape == (1,)
    client.close()
    url = f"http://127.0.0.1:{mesh['gateway'].ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    series = [line for line in text.splitlines() if line.startswith("meshserve_gateway_requests")]
    assert any('model="_unknown"' in line for line in series), series
    assert any('model="digits"' in line for line in series), series
    assert not [line for line in series for name in minted if name[:40] in line]


def _input(rows: int) -> tc.InferInput:
    inp = tc.InferInput("input", [rows, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((rows, 64), np.float32))
    return inp
