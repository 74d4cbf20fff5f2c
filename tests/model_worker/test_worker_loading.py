"""Model formats, output mapping, warmup, the bucket runner (CPU static-buffer path and
CUDA graphs), and the classifier post-processing."""

from __future__ import annotations

import pytest
import torch
from worker_models import mlp_config, save_mlp, write_config

from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelRepository, parse_config
from meshserve.model_worker.cuda_graphs import BucketRunner, InputSpec, choose_bucket
from meshserve.model_worker.execution import BatchRequest, WireTensor, postprocess, run_batch
from meshserve.model_worker.loader import load_network, output_mapper
from meshserve.model_worker.models import load_model

CPU = torch.device("cpu")


class Custom:
    pass


@pytest.mark.parametrize("layout", ["state_dict", "model_state_dict", "flat"])
def test_mlp_checkpoint_gives_the_reference_numbers(tmp_path, layout):
    path = tmp_path / "m.pth"
    reference = save_mlp(path, layout=layout)
    config = parse_config(mlp_config(), "test", "m")
    net = load_network(config, path, CPU)
    x = torch.randn(6, 4)
    with torch.inference_mode():
        assert torch.equal(net(x), reference(x))
    assert not net.training


def test_checkpoint_with_custom_object_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    save_mlp(path)
    data = torch.load(path, weights_only=True)
    data["extra"] = Custom()  # a pickled custom class: only full unpickling builds it
    torch.save(data, path)
    with pytest.raises(InvalidInput, match="evil.pth.*weights-only"):
        load_network(parse_config(mlp_config(), "test", "m"), path, CPU)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(input_size="4"), "input_size"),
    (lambda d: d["state_dict"].pop("fc3.bias"), "2 Linear layers"),
    (lambda d: d.update(input_size=7), "do not fit"),
])
def test_malformed_checkpoints_name_the_file_and_problem(tmp_path, mutate, message):
    path = tmp_path / "bad.pth"
    save_mlp(path)
    data = torch.load(path, weights_only=True)
    mutate(data)
    torch.save(data, path)
    with pytest.raises(InvalidInput, match=message) as err:
        load_network(parse_config(mlp_config(), "test", "m"), path, CPU)
    assert "bad.pth" in str(err.value)


def test_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InvalidInput, match="must be a dict"):
        load_network(parse_config(mlp_config(), "test", "m"), path, CPU)


def test_torchscript_loads_in_eval_mode(models_dir):
    repo = ModelRepository(models_dir)
    net = load_network(repo.config("digits"), repo.model_file("digits", "1"), CPU)
    assert isinstance(net, torch.jit.ScriptModule) and not net.training


class _Multi(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        a, b = x * 2, x + 1
        if self.kind == "dict":
            return {"b": b, "a": a}
        return (a, b) if self.kind == "tuple" else [a, b]


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_network_return_values_map_onto_model_outputs_in_order(kind):
    config = parse_config(mlp_config(outputs=[
        {"name": "a", "datatype": "FP32", "dims": [4]},
        {"name": "b", "datatype": "FP32", "dims": [4]},
    ]), "test", "m")
    a, b = output_mapper(config, _Multi(kind))(torch.ones(2, 4))
    assert torch.equal(a, torch.full((2, 4), 2.0)) and torch.equal(b, torch.full((2, 4), 2.0))
    with pytest.raises(InvalidInput, match="returned 1 outputs"):
        output_mapper(config, torch.nn.Identity())(torch.ones(2, 4))


def test_warmup_covers_every_bucket(tiny_repo):
    repo = ModelRepository(tiny_repo)
    config = parse_config({**mlp_config(max_batch=24), "batching": {"preferred_batch_sizes": [6]},
                           "warmup": {"batch_sizes": [3]}}, "test", "m")
    save_mlp(tiny_repo / "w" / "1" / "model.pth")
    model = load_model(config, tiny_repo / "w" / "1" / "model.pth", "1", "cpu", True)
    assert config.buckets() == (1, 2, 3, 4, 6, 8, 16, 24)
    assert [b for b, _ in model.warmup] == list(config.buckets())
    assert all(ns > 0 for _, ns in model.warmup)
    assert model.load_ns > 0 and not model.cuda_graphs
    assert model.byte_size == (4 * 5 + 5 + 5 * 3 + 3) * 4
    digits = load_model(repo.config("digits"), repo.model_file("digits", "2"), "2", "cpu", True)
    assert [b for b, _ in digits.warmup] == [1, 2, 4, 8, 16, 32, 64]


def test_load_refuses_outputs_that_do_not_match_the_config(tmp_path):
    config = parse_config(mlp_config(outputs=[{"name": "logits", "datatype": "INT64",
                                               "dims": [3]}]), "test", "m")
    save_mlp(tmp_path / "m.pth")
    with pytest.raises(InvalidInput, match="output 'logits' is FP32 \\[3\\].*INT64"):
        load_model(config, tmp_path / "m.pth", "1", "cpu", True)


# ----------------------------------------------------------------------- bucket runner


def test_choose_bucket():
    buckets = (1, 2, 4, 8, 16)
    assert [choose_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [
        1, 2, 4, 8, 8, 16, 16, None]


def _digits_runner(models_dir, **kwargs):
    net = torch.jit.load(str(models_dir / "digits" / "1" / "model.pt")).eval()
    spec = [InputSpec("input", torch.float32, (64,))]
    return net, BucketRunner(lambda x: (net(x),), spec, (1, 2, 4, 8, 16), CPU, **kwargs)


def test_static_buffer_runner_equals_the_direct_call_and_reuses_buffers(models_dir):
    net, runner = _digits_runner(models_dir, static_buffers=True)
    assert runner.static and not runner.use_graphs
    torch.manual_seed(0)
    for rows, bucket in [(3, 4), (8, 8), (1, 1), (11, 16), (4, 4), (2, 2)]:
        x = torch.rand(rows, 64) * 16
        before = [t.data_ptr() for t in runner.static_inputs(bucket)]
        (out,), executed = runner.run([x])
        assert executed == bucket and out.shape == (rows, 10)
        with torch.inference_mode():
            # Padded to its bucket the GEMM may block differently: equal up to float sums.
            torch.testing.assert_close(out, net(x), rtol=0, atol=1e-5)
        static = runner.static_inputs(bucket)[0]
        assert [t.data_ptr() for t in runner.static_inputs(bucket)] == before
        assert torch.equal(static[:rows], x)
        assert not static[rows:].any()  # rows past the batch are zero-filled


def test_padding_is_cleared_after_a_larger_batch(models_dir):
    net, runner = _digits_runner(models_dir, static_buffers=True)
    runner.run([torch.full((4, 64), 5.0)])
    runner.run([torch.ones(3, 64)])
    static = runner.static_inputs(4)[0]
    assert torch.equal(static[:3], torch.ones(3, 64)) and not static[3].any()


def test_batches_past_the_largest_bucket_and_eager_runners_run_at_their_size(models_dir):
    net, runner = _digits_runner(models_dir, static_buffers=True)
    x = torch.rand(20, 64)
    (out,), executed = runner.run([x])
    assert executed == 20
    with torch.inference_mode():
        assert torch.equal(out, net(x))
    _, eager = _digits_runner(models_dir, static_buffers=False)
    assert eager.bucket_for(3) is None and eager.run([x[:3]])[1] == 3


def test_graphs_are_never_used_on_cpu(models_dir):
    _, runner = _digits_runner(models_dir, static_buffers=False, use_graphs=True)
    assert not runner.use_graphs and not runner.static


@pytest.mark.cuda
def test_cuda_graph_runner_matches_eager(models_dir):
    device = torch.device("cuda:0")
    net = torch.jit.load(str(models_dir / "digits" / "2" / "model.pt"), map_location=device)
    net.eval()
    spec = [InputSpec("input", torch.float32, (64,))]
    runner = BucketRunner(lambda x: (net(x),), spec, (1, 2, 4, 8, 16), device,
                          static_buffers=True, use_graphs=True)
    assert runner.use_graphs
    timings = runner.warmup()
    assert [b for b, _ in timings] == [1, 2, 4, 8, 16]
    torch.manual_seed(0)
    for rows, bucket in [(3, 4), (16, 16), (1, 1), (5, 8), (17, 17)]:
        x = torch.rand(rows, 64) * 16
        (out,), executed = runner.run([x])
        assert executed == bucket and out.device.type == "cpu" and out.shape == (rows, 10)
        with torch.inference_mode():
            torch.testing.assert_close(out, net(x.to(device)).cpu())


@pytest.mark.cuda
def test_load_model_on_cuda_captures_graphs_and_counts_their_memory(models_dir):
    repo = ModelRepository(models_dir)
    config = repo.config("digits")
    model = load_model(config, repo.model_file("digits", "1"), "1", "cuda:0", True)
    assert model.cuda_graphs and [b for b, _ in model.warmup] == list(config.buckets())
    assert model.byte_size >= (64 * 64 + 64 + 64 * 10 + 10) * 4
    eager = load_model(config, repo.model_file("digits", "1"), "1", "cuda:0", False)
    assert not eager.cuda_graphs


# ------------------------------------------------------------------- post-processing


def _tiny_config():
    return parse_config(mlp_config(
        outputs=[
            {"name": "logits", "datatype": "FP32", "dims": [3]},
            {"name": "probs", "datatype": "FP32", "dims": [3]},
            {"name": "label", "datatype": "INT64", "dims": []},
            {"name": "top_idx", "datatype": "INT64", "dims": [2]},
            {"name": "top_p", "datatype": "FP32", "dims": [2]},
        ],
        classifier={"logits": "logits", "probabilities": "probs", "predictions": "label",
                    "top_k": 2, "top_k_indices": "top_idx", "top_k_probabilities": "top_p"},
    ), "test", "tiny")


def test_classifier_post_processing_with_top_k():
    config = _tiny_config()
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    out = postprocess(config, [logits], [t.name for t in config.outputs])
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(out["logits"], logits) and torch.equal(out["probs"], probs)
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [1, 2]
    assert out["top_idx"].tolist() == [[1, 2], [2, 0]] and out["top_idx"].dtype == torch.int64
    torch.testing.assert_close(out["top_p"], probs.gather(1, out["top_idx"]))


def test_post_processing_computes_only_what_is_asked():
    out = postprocess(_tiny_config(), [torch.tensor([[1.0, 3.0, 2.0]])], ["label"])
    assert list(out) == ["label"] and out["label"].shape == (1,)


def test_run_batch_validates_and_encodes(tmp_path):
    config = _tiny_config()
    folder = write_config(tmp_path, "tiny", {})
    net = save_mlp(folder / "1" / "model.pth")
    model = load_model(config, folder / "1" / "model.pth", "1", "cpu", True)
    x = torch.randn(3, 4)
    raw = WireTensor("x", "FP32", (3, 4), x.numpy().tobytes())
    request = BatchRequest(7, "tiny", "1", (raw,), ("top_p", "label"))
    outcome = run_batch(config, model.runner, request)
    assert outcome.batch_id == 7 and outcome.executed_batch_size == 3 and outcome.rows == 3
    assert [(t.name, t.datatype, t.shape) for t in outcome.outputs] == [
        ("label", "INT64", (3,)), ("top_p", "FP32", (3, 2))]
    with torch.inference_mode():
        expected = net(x).argmax(1)
    assert torch.frombuffer(bytearray(outcome.outputs[0].data), dtype=torch.int64).tolist() == \
        expected.tolist()


@pytest.mark.parametrize("inputs, outputs, message", [
    ((WireTensor("x", "FP64", (1, 4), b"\0" * 32),), (), "datatype FP64, expected FP32"),
    ((WireTensor("x", "FP32", (1, 5), b"\0" * 20),), (), r"shape \[1, 5\], expected \[-1, 4\]"),
    ((WireTensor("x", "FP32", (1, 4), b"\0" * 12),), (), "12 bytes of data, expected 16"),
    ((WireTensor("x", "FP32", (9, 4), b"\0" * 144),), (), "batch of 9 exceeds max_batch_size 8"),
    ((WireTensor("x", "FP32", (0, 4), b""),), (), "batch dimension is 0"),
    ((), (), r"missing input\(s\) x"),
    ((WireTensor("x", "FP32", (1, 4), b"\0" * 16),) * 2, (), "given more than once"),
    ((WireTensor("y", "FP32", (1, 4), b"\0" * 16),), (), "unknown input 'y'"),
    ((WireTensor("x", "FP32", (1, 4), b"\0" * 16),), ("nope",), "has no output 'nope'"),
])
def test_bad_batches_are_refused_with_a_clear_message(inputs, outputs, message):
    with pytest.raises(InvalidInput, match=message):
        run_batch(_tiny_config(), None, BatchRequest(1, "tiny", "1", inputs, outputs))
