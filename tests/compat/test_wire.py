"""Wire compatibility with tritonclient: our messages parse with tritonclient's generated
classes, with every field where Triton expects it, and parse back unchanged.

Our `inference` protos run in a subprocess (tests/compat/ours.py): they cannot share a
descriptor pool with tritonclient's, which this process imports."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton

OURS = Path(__file__).with_name("ours.py")


def run_ours(mode: str, models_dir, stdin: str | None = None) -> str:
    out = subprocess.run(
        [sys.executable, str(OURS), mode, str(models_dir)],
        input=stdin, capture_output=True, text=True, check=True, timeout=120,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def parsed(models_dir):
    emitted = json.loads(run_ours("emit", models_dir))
    messages = {}
    for name, data in emitted.items():
        message = getattr(triton, name).FromString(base64.b64decode(data))
        stripped = type(message)()
        stripped.CopyFrom(message)
        stripped.DiscardUnknownFields()
        # Every field we send is a field Triton knows, with the same number and type.
        assert stripped == message, f"{name} carries fields tritonclient does not know"
        messages[name] = message
    return messages


def test_infer_request_fields(parsed):
    req = parsed["ModelInferRequest"]
    assert (req.model_name, req.model_version, req.id) == ("digits", "2", "req-1")
    assert req.inputs[0].name == "input" and req.inputs[0].datatype == "FP32"
    assert list(req.inputs[0].shape) == [2, 64]
    assert req.raw_input_contents[0] == bytes(range(256)) * 2
    assert req.parameters["priority"].int64_param == 1
    assert req.parameters["timeout"].int64_param == 5000
    assert req.parameters["note"].string_param == "x"
    assert req.parameters["ratio"].double_param == 0.5
    assert req.parameters["big"].uint64_param == 2**63
    assert req.outputs[0].parameters["binary_data"].bool_param is True


def test_infer_response_fields(parsed):
    resp = parsed["ModelInferResponse"]
    values = np.frombuffer(resp.raw_output_contents[0], dtype="<i8")
    assert values.tolist() == [3, 8]
    assert resp.outputs[0].datatype == "INT64" and list(resp.outputs[0].shape) == [2]
    assert resp.parameters["cache_hit"].bool_param is True
    stream = parsed["ModelStreamInferResponse"]
    assert stream.error_message == "boom" and stream.infer_response.id == "req-1"


def test_metadata_and_config_fields(parsed):
    meta = parsed["ModelMetadataResponse"]
    assert meta.name == "digits" and list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [t.name for t in meta.outputs] == ["logits", "probabilities", "predictions"]
    config = parsed["ModelConfigResponse"].config
    assert config.max_batch_size == 64
    # Triton's convention: dims exclude the batch dimension (perf_analyzer builds inputs from it).
    assert list(config.input[0].dims) == [64]
    assert config.input[0].data_type == triton_mc.TYPE_FP32
    assert config.output[2].data_type == triton_mc.TYPE_INT64
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert config.dynamic_batching.priority_levels == 2
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 4096
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.platform == "pytorch_libtorch"
    assert config.response_cache.enable is True


def test_statistics_and_index_fields(parsed):
    s = parsed["ModelStatisticsResponse"].model_stats[0]
    assert (s.name, s.version, s.inference_count, s.execution_count) == ("digits", "2", 47, 3)
    assert s.last_inference == 1_700_000_000_000
    assert s.inference_stats.cache_hit.count == 5 and s.inference_stats.cache_hit.ns == 300
    assert s.inference_stats.cache_miss.count == 4
    assert s.inference_stats.success.count == 15 and s.inference_stats.queue.ns == 700
    assert s.batch_stats[0].batch_size == 16 and s.batch_stats[0].compute_infer.count == 2
    index = parsed["RepositoryIndexResponse"].models
    assert [(m.name, m.version, m.state, m.reason) for m in index] == [
        ("digits", "1", "READY", ""), ("digits", "2", "UNAVAILABLE", "unloaded")]


def test_round_trip_back_to_ours(parsed, models_dir):
    back = {name: base64.b64encode(m.SerializeToString()).decode() for name, m in parsed.items()}
    assert run_ours("check", models_dir, json.dumps(back)) == "ok"


def test_triton_built_request_parses_as_ours(models_dir):
    """A request built the way tritonclient builds it reaches us intact."""
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc._utils import _get_inference_request

    data = np.arange(128, dtype=np.float32).reshape(2, 64)
    inp = InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(data)
    request = _get_inference_request(
        model_name="digits", inputs=[inp], model_version="2", request_id="r",
        outputs=[InferRequestedOutput("predictions")], sequence_id=0, sequence_start=False,
        sequence_end=False, priority=1, timeout=None, parameters=None,
    )
    code = (
        "import sys, base64, numpy as np\n"
        "from meshserve.gateway import convert\n"
        "from meshserve.pb.inference import grpc_service_pb2 as pb\n"
        "r = pb.ModelInferRequest.FromString(base64.b64decode(sys.stdin.read()))\n"
        "[t] = convert.infer_inputs(r)\n"
        "a = np.frombuffer(t.data, '<f4').reshape(t.shape)\n"
        "print(r.model_name, r.model_version, t.name, t.datatype, list(t.shape), float(a.sum()),"
        " r.parameters['priority'].WhichOneof('parameter_choice'), r.outputs[0].name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=base64.b64encode(request.SerializeToString()).decode(),
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()
    assert out[:5] == ["digits", "2", "input", "FP32", "[2,"]
    assert float(out[6]) == float(data.sum())
    assert out[7:] in (["uint64_param", "predictions"], ["int64_param", "predictions"])
