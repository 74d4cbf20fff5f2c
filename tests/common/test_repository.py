"""Model config validation and the repository (services/common/repository.py)."""

from __future__ import annotations

import copy
import json

import pytest

from meshserve.batcher.queue import BatchPolicy
from meshserve.common.errors import ConfigError, InvalidInput, NotFound
from meshserve.common.repository import (
    BatchingConfig,
    ModelRepository,
    VersionPolicy,
    parse_config,
)


@pytest.fixture
def digits(models_dir) -> dict:
    return json.loads((models_dir / "digits" / "config.json").read_text())


def test_the_digits_config_parses(models_dir):
    config = ModelRepository(models_dir).config("digits")
    assert config.format == "torchscript" and config.max_batch_size == 64
    assert [t.name for t in config.inputs] == ["input"] and config.inputs[0].dims == (64,)
    assert [t.name for t in config.model_outputs] == ["logits"]
    assert config.classifier.predictions == "predictions"
    assert config.batching.preferred_batch_sizes == (16, 32)
    assert config.default_version == "2" and config.platform == "pytorch_libtorch"
    assert config.buckets() == (1, 2, 4, 8, 16, 32, 64)


def _mutated(config: dict, change) -> dict:
    config = copy.deepcopy(config)
    change(config)
    return config


@pytest.mark.parametrize("change, field, message", [
    (lambda c: c.update(max_batch_size="64"), "max_batch_size", "must be int"),
    (lambda c: c.update(max_batch_size=True), "max_batch_size", "must be int"),
    (lambda c: c.update(colour="red"), "colour", "unknown field"),
    (lambda c: c["inputs"][0].update(datatype="FP8"), "inputs[0].datatype", "'FP8'"),
    (lambda c: c["inputs"][0].update(dims=[0]), "inputs[0].dims", "positive integers or -1"),
    (lambda c: c["batching"].update(preferred_batch_sizes=[128]),
     "batching.preferred_batch_sizes", "128 exceeds max_batch_size 64"),
    (lambda c: c.update(version_policy={"latest": 0}), "version_policy.latest", ">= 1"),
    (lambda c: c.update(version_policy={"all": True, "latest": 1}), "version_policy",
     "exactly one"),
    (lambda c: c.update(version_policy={"newest": 1}), "version_policy.newest", "unknown field"),
    (lambda c: c["classifier"].update(predictions="labels"), "classifier.predictions",
     "'labels' is not a declared output"),
    (lambda c: c["outputs"][2].update(datatype="INT32"), "classifier.predictions",
     "must be declared INT64"),
    (lambda c: c.update(format="onnx"), "format", "'onnx' is not one of"),
    (lambda c: c.update(default_version="v2"), "default_version", "positive integer"),
    (lambda c: c.update(model_filename="../model.pt"), "model_filename", "plain file name"),
    (lambda c: c.update(name="other"), "name", "does not match"),
    (lambda c: c.update(inputs=[]), "inputs", "at least one input"),
    (lambda c: c["warmup"].update(batch_sizes=[65]) if "warmup" in c
     else c.update(warmup={"batch_sizes": [65]}), "warmup.batch_sizes", "exceeds"),
])
def test_a_bad_field_names_the_file_and_the_field(digits, change, field, message):
    with pytest.raises(ConfigError) as err:
        parse_config(_mutated(digits, change), "models/digits/config.json", "digits")
    text = str(err.value)
    assert text.startswith("models/digits/config.json: ")
    assert f": {field}: " in text and message in text


def test_version_policy_selection():
    available = [3, 1, 2]
    assert VersionPolicy("latest", num_versions=1).select(available) == [3]
    assert VersionPolicy("latest", num_versions=2).select(available) == [2, 3]
    assert VersionPolicy("all").select(available) == [1, 2, 3]
    assert VersionPolicy("specific", versions=(1, 5)).select(available) == [1]
    assert VersionPolicy().select([]) == []


def _repo(tmp_path, config: dict, versions=(1, 2, 3)) -> ModelRepository:
    folder = tmp_path / config["name"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for v in versions:
        (folder / str(v)).mkdir()
        (folder / str(v) / "model.pt").write_bytes(b"x")
    (folder / "notes").mkdir()
    return ModelRepository(tmp_path)


def test_versions_and_default_version(tmp_path, digits):
    del digits["default_version"]
    digits["version_policy"] = {"latest": 2}
    repo = _repo(tmp_path, digits)
    assert repo.versions("digits") == [1, 2, 3]
    assert repo.served_versions("digits") == [2, 3]
    assert repo.default_version("digits") == "3"
    assert repo.model_file("digits", "2").name == "model.pt"
    with pytest.raises(NotFound, match="no version 7"):
        repo.model_file("digits", "7")


def test_explicit_default_version(models_dir):
    assert ModelRepository(models_dir).default_version("digits") == "2"


@pytest.mark.parametrize("name", ["../x", "/etc", "..", "a/b", "", ".hidden", "digits/../x"])
def test_model_names_that_could_escape_the_repository_are_refused(models_dir, name):
    with pytest.raises(InvalidInput, match="invalid model name"):
        ModelRepository(models_dir).config(name)


def test_unknown_model_and_missing_repository(models_dir, tmp_path):
    with pytest.raises(NotFound, match="not in the model repository"):
        ModelRepository(models_dir).config("nope")
    with pytest.raises(ConfigError, match="is not a directory"):
        ModelRepository(tmp_path / "missing")


def test_buckets_include_preferred_and_warmup_sizes(digits):
    digits["max_batch_size"] = 24
    digits["batching"]["preferred_batch_sizes"] = [6]
    digits["warmup"] = {"batch_sizes": [3]}
    assert parse_config(digits, "c", "digits").buckets() == (1, 2, 3, 4, 6, 8, 16, 24)
    digits["max_batch_size"] = 0
    digits["batching"]["preferred_batch_sizes"] = []
    digits["warmup"] = {}
    assert parse_config(digits, "c", "digits").buckets() == (1,)


def test_invalid_json_names_the_file(tmp_path, digits):
    repo = _repo(tmp_path, digits)
    (tmp_path / "digits" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="digits/config.json: invalid JSON"):
        repo.config("digits")


@pytest.mark.parametrize("section", ["batching", "cache", "warmup"])
def test_an_empty_section_means_the_dataclass_defaults(digits, section):
    """One source for every default: a section given as {} parses to the same config as a
    section left out, and the batcher's BatchPolicy starts from the same values."""
    without = _mutated(digits, lambda c: (c.pop("batching", None), c.pop(section, None)))
    empty = _mutated(without, lambda c: c.__setitem__(section, {}))
    assert parse_config(empty, "x") == parse_config(without, "x")
    assert parse_config(without, "x").batching == BatchingConfig()
    assert BatchPolicy(max_batch_size=8) == BatchPolicy.from_config(8, BatchingConfig())
