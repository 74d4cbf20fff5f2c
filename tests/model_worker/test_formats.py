"""Every format, torch.compile and reduced precision against the TorchScript digits model
on the whole digits data set; the load errors of wrong files, wrong devices, unsafe
archives and failed compiles. The models are written by models/digits/export.py from the
shipped weights, once per module (an AOTInductor package and a compile take tens of
seconds on CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from meshserve.common.errors import ConfigError, FailedPrecondition, InvalidInput
from meshserve.common.repository import ModelRepository
from meshserve.model_worker.convert import model_to_pb
from meshserve.model_worker.models import ModelCache, load_model
from tests.conftest import MODELS

VERSION = "1"
# Logits against TorchScript's: fp32 formats may reorder float sums (AOTInductor and
# torch.compile generate their own kernels); bf16 keeps 8 bits of mantissa, logits are
# within +-30 here.
FP32_ATOL = 1e-4
BF16_ATOL = 0.5


def _export_tool():
    spec = importlib.util.spec_from_file_location("digits_export_tool",
                                                  MODELS / "digits" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPORT = _export_tool()


def _variant(root: Path, base: str, name: str, **changes) -> None:
    shutil.copytree(root / base, root / name)
    config = json.loads((root / name / "config.json").read_text())
    config.update(name=name, **changes)
    (root / name / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats") / "models"
    for fmt in EXPORT.MODELS:
        EXPORT.write_config(fmt, root)
        EXPORT.write(fmt, VERSION, root, "cpu")
    _variant(root, "digits_export", "digits_compiled", compile={"dynamic": True})
    _variant(root, "digits_export", "digits_bf16", precision="bf16")
    _variant(root, "digits_ts", "digits_ts_bf16", precision="bf16")
    return root


@pytest.fixture(scope="module")
def loaded(repo):
    """name -> LoadedModel, each loaded once on first use."""
    repository = ModelRepository(repo)
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(repository.config(name), repository.model_file(
                name, VERSION), VERSION, "cpu", True)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x, _ = load_digits(return_X_y=True)
    return torch.from_numpy(x.astype("float32"))


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    """Every row through the worker's runner, in batches of the model's max batch size."""
    step = model.config.max_batch_size
    return torch.cat([model.runner.run([x[i:i + step]])[0][0] for i in range(0, len(x), step)])


@pytest.mark.parametrize("name, atol", [
    ("digits_export", FP32_ATOL), ("digits_mlp", FP32_ATOL), ("digits_aoti", FP32_ATOL),
    ("digits_compiled", FP32_ATOL), ("digits_bf16", BF16_ATOL), ("digits_ts_bf16", BF16_ATOL),
])
def test_every_format_predicts_as_torchscript(loaded, digits, name, atol):
    reference = logits_of(loaded("digits_ts"), digits)
    logits = logits_of(loaded(name), digits)
    assert logits.dtype == torch.float32  # the declared datatype, whatever the precision
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.99, f"{name}: argmax agrees on {agree:.4f} of {len(digits)} rows"
    assert (logits - reference).abs().max().item() <= atol


def test_compiled_model_warmed_every_bucket_and_reports_compile(repo, loaded):
    model = loaded("digits_compiled")
    assert model.compiled and model.compile_ns > 0 and not model.compile_error
    assert [b for b, _ in model.warmup] == list(model.config.buckets())
    assert model.runner.static  # padded to buckets: no shape is compiled while serving

    async def status():
        cache = ModelCache(ModelRepository(repo), "cpu", max_models=2,
                           loader=lambda *_: model)
        return await cache.load("digits_compiled", VERSION)

    pb = model_to_pb(asyncio.run(status()))
    assert (pb.format, pb.precision, pb.compile_mode, pb.compiled) == (
        "torch_export", "fp32", "default", True)
    assert pb.compile_ns == model.compile_ns and pb.compile_error == ""


def _broken_compiler():
    import torch._inductor.config as inductor

    return inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True})


@pytest.mark.parametrize("fallback", [False, True])
def test_compile_failure_fails_the_load_or_falls_back(repo, digits, loaded, fallback):
    name = f"digits_nocxx_{fallback}".lower()
    _variant(repo, "digits_export", name, compile={"dynamic": True, "fallback": fallback})
    repository = ModelRepository(repo)
    path = repository.model_file(name, VERSION)
    with _broken_compiler():
        if not fallback:
            with pytest.raises(InvalidInput) as err:
                load_model(repository.config(name), path, VERSION, "cpu", True)
            message = str(err.value)
            assert f"model '{name}' version 1 ({path})" in message
            assert "torch.compile (mode default) failed" in message
            assert "No working C++ compiler" in message  # the compiler's own words
            return
        model = load_model(repository.config(name), path, VERSION, "cpu", True)
    assert not model.compiled and "No working C++ compiler" in model.compile_error
    assert [b for b, _ in model.warmup] == list(model.config.buckets())
    assert torch.equal(logits_of(model, digits).argmax(1),
                       logits_of(loaded("digits_ts"), digits).argmax(1))


def _load(repo: Path, name: str, fmt: str, source: Path | bytes):
    """Loads `source` (a file or bytes) as version 1 of a fresh model of format `fmt`."""
    EXPORT.write_config(fmt, repo)
    folder = repo / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(repo / EXPORT.MODELS[fmt][0], folder, ignore=shutil.ignore_patterns("1"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "name": name}))
    target = folder / VERSION / EXPORT.MODELS[fmt][1]
    target.parent.mkdir(parents=True)
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copyfile(source, target)
    repository = ModelRepository(repo)
    return target, lambda: load_model(repository.config(name), target, VERSION, "cpu", True)


@pytest.mark.parametrize("fmt, source, message", [
    ("torch_export", "digits_ts/1/model.pt", "it is a TorchScript file"),
    ("torch_export", "digits_aoti/1/model.pt2", "is an AOTInductor package"),
    ("torch_export", "digits_mlp/1/model.pth", "not a .pt2 archive"),
    ("aot_inductor", "digits_export/1/model.pt2", "it is a torch.export program"),
    ("aot_inductor", "digits_ts/1/model.pt", "it is a TorchScript file"),
    ("torchscript", "digits_export/1/model.pt2", "not a loadable TorchScript file"),
    ("mlp_checkpoint", "digits_export/1/model.pt2", "not a weights-only PyTorch checkpoint"),
])
def test_wrong_file_for_the_format_names_model_version_and_file(repo, fmt, source, message):
    path, load = _load(repo, "wrong", fmt, repo / source)
    with pytest.raises(InvalidInput) as err:
        load()
    assert str(err.value).startswith(f"model 'wrong' version 1: {path}: ")
    assert message in str(err.value)


def _rewrite(archive: Path, edit) -> bytes:
    """The archive with edit(entry name, bytes) -> bytes | None applied to every entry."""
    out = io.BytesIO()
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info, data)
    return out.getvalue()


def test_package_for_another_device_is_refused(repo):
    def to_cuda(name: str, data: bytes) -> bytes:
        if name.endswith("_metadata.json"):
            meta = json.loads(data)
            return json.dumps({**meta, "AOTI_DEVICE_KEY": "cuda"}).encode()
        return data

    path, load = _load(repo, "cuda_package", "aot_inductor",
                       _rewrite(repo / "digits_aoti/1/model.pt2", to_cuda))
    with pytest.raises(FailedPrecondition) as err:
        load()
    assert str(err.value).startswith(f"model 'cuda_package' version 1: {path}: ")
    assert "AOTInductor package compiled for cuda, this worker runs on cpu" in str(err.value)


class Marker:
    """Unpickling this writes a file: the proof that a load unpickled it."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


@pytest.mark.parametrize("target", ["weights", "sample_inputs"])
def test_export_archive_that_would_unpickle_is_refused_unread(repo, tmp_path, target):
    Marker.path = str(tmp_path / "ran")
    payload = io.BytesIO()
    torch.save(Marker(), payload)

    def poison(name: str, data: bytes) -> bytes:
        if target == "weights" and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if target == "weights" and name.endswith("data/weights/weight_0"):
            return payload.getvalue()
        if target == "sample_inputs" and name.endswith("data/sample_inputs/model.pt"):
            return payload.getvalue()
        return data

    path, load = _load(repo, "poisoned", "torch_export",
                       _rewrite(repo / "digits_export/1/model.pt2", poison))
    with pytest.raises(InvalidInput, match="would be unpickled when loading; refused"):
        load()
    assert not (tmp_path / "ran").exists()
    # torch itself would have run it: the archive is a real attack, not a broken file.
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert (tmp_path / "ran").read_text() == "unpickled"


def test_fp16_that_cannot_run_is_refused_with_a_clear_message(repo, tmp_path):
    class MixedDtypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)
            self.scale = torch.ones(10)  # a plain attribute: a dtype cast leaves it fp32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) @ torch.diag(self.scale)

    torch.jit.save(torch.jit.script(MixedDtypes()), str(tmp_path / "mixed.pt"))
    EXPORT.write_config("torchscript", repo)
    config = json.loads((repo / "digits_ts" / "config.json").read_text())
    folder = repo / "mixed"
    (folder / VERSION).mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config, "name": "mixed",
                                                    "precision": "fp16"}))
    shutil.copyfile(tmp_path / "mixed.pt", folder / VERSION / "model.pt")
    repository = ModelRepository(repo)
    with pytest.raises(FailedPrecondition) as err:
        load_model(repository.config("mixed"), repository.model_file("mixed", VERSION),
                   VERSION, "cpu", True)
    message = str(err.value)
    assert message.startswith(f"model 'mixed' version 1 ({folder / VERSION / 'model.pt'}): ")
    assert "does not run in precision fp16 on cpu" in message and "use bf16 or fp32" in message


@pytest.mark.parametrize("changes, message", [
    ({"format": "torchscript", "compile": {}}, "export the model with torch.export instead"),
    ({"format": "aot_inductor", "compile": {}}, "it is compiled already"),
    ({"compile": {"mode": "fast"}}, "compile.mode: 'fast' is not one of default"),
    ({"compile": {"dynamic": "yes"}}, "compile.dynamic: must be bool"),
    ({"precision": "fp8"}, "precision: 'fp8' is not one of fp32, bf16, fp16"),
    ({"format": "aot_inductor", "precision": "bf16"}, "runs at the precision it was compiled"),
])
def test_compile_and_precision_config_errors(changes, message):
    from meshserve.common.repository import parse_config

    config = {**json.loads((MODELS / "digits_export" / "config.json").read_text()), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_config(config, "config.json", "digits_export")


def test_shipped_torch_export_example_matches_the_digits_versions(digits):
    repository = ModelRepository(MODELS)
    assert repository.versions("digits_export") == repository.versions("digits")
    for version in map(str, repository.versions("digits")):
        models = [load_model(repository.config(n), repository.model_file(n, version), version,
                             "cpu", True) for n in ("digits", "digits_export")]
        reference, exported = (logits_of(m, digits) for m in models)
        assert (reference - exported).abs().max().item() <= FP32_ATOL


@pytest.mark.cuda
@pytest.mark.parametrize("mode, worker_graphs", [("default", True), ("reduce-overhead", False)])
def test_cuda_compile_modes_and_the_workers_graphs(repo, digits, loaded, mode, worker_graphs):
    name = f"digits_cuda_{mode}"
    _variant(repo, "digits_export", name, compile={"mode": mode}, precision="bf16")
    repository = ModelRepository(repo)
    model = load_model(repository.config(name), repository.model_file(name, VERSION), VERSION,
                       "cuda:0", True)
    assert model.compiled and model.cuda_graphs is worker_graphs
    agree = (logits_of(model, digits).argmax(1)
             == logits_of(loaded("digits_ts"), digits).argmax(1)).float().mean().item()
    assert agree >= 0.99


@pytest.mark.cuda
def test_cuda_aot_inductor_package(repo, digits, loaded, tmp_path):
    EXPORT.write("aot_inductor", VERSION, tmp_path, "cuda")
    path, load = _load(repo, "digits_aoti_cuda", "aot_inductor",
                       tmp_path / "digits_aoti" / VERSION / "model.pt2")
    repository = ModelRepository(repo)
    model = load_model(repository.config("digits_aoti_cuda"), path, VERSION, "cuda:0", True)
    assert (logits_of(model, digits) - logits_of(loaded("digits_ts"), digits)).abs().max() < 1e-3
    with pytest.raises(FailedPrecondition, match="compiled for cuda, this worker runs on cpu"):
        load()


def test_config_that_the_exported_program_refuses_is_a_load_error(repo):
    config = json.loads((repo / "digits_export" / "config.json").read_text())
    config["inputs"][0]["dims"] = [32]
    path, load = _load(repo, "narrow", "torch_export", repo / "digits_export/1/model.pt2")
    (repo / "narrow" / "config.json").write_text(json.dumps({**config, "name": "narrow"}))
    with pytest.raises(InvalidInput) as err:
        load()
    assert str(err.value).startswith(f"model 'narrow' version 1: {path}: the exported program "
                                     "refuses inputs the config declares (input FP32 [1, 32])")


FIRST_LOADS = """
import sys, threading
from meshserve.common.repository import ModelRepository
from meshserve.model_worker.models import load_model

repo, errors = ModelRepository(sys.argv[1]), []

def load(name):
    try:
        load_model(repo.config(name), repo.model_file(name, "1"), "1", "cpu", True)
    except Exception as e:
        errors.append(f"{name}: {e}")

threads = [threading.Thread(target=load, args=(n,)) for n in sys.argv[2:]]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors))
sys.exit(1 if errors else 0)
"""


def test_first_loads_of_pt2_models_at_once_in_a_fresh_process(repo):
    """torch.export and inductor import lazily; two threads doing it at once used to fail
    on partially initialized modules (a worker loads its models concurrently)."""
    names = ["digits_export", "digits_aoti", "digits_bf16", "digits_export", "digits_aoti"]
    done = subprocess.run([sys.executable, "-c", FIRST_LOADS, str(repo), *names],
                          capture_output=True, text=True, timeout=600, cwd=MODELS.parent)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
