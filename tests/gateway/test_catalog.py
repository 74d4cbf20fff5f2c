"""The gateway's catalog: requests read a snapshot, the disk is read on start, on load and
in the background, and a broken config spoils only its own model."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest

from meshserve.common.errors import ConfigError, InvalidInput, NotFound
from meshserve.common.repository import ModelRepository
from meshserve.gateway.core import Catalog
from tests.conftest import MODELS


@pytest.fixture
def repo(tmp_path):
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    return tmp_path


def _counting(repository: ModelRepository) -> list[int]:
    """Records the thread of every config read of `repository`."""
    reads: list[int] = []
    read = repository.config

    def config(name):
        reads.append(threading.get_ident())
        return read(name)

    repository.config = config
    return reads


def _set_default(repo, version: str) -> None:
    path = repo / "digits" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "default_version": version}))


def test_requests_read_the_snapshot_and_a_stale_one_is_read_again_in_the_background(repo):
    repository = ModelRepository(repo)
    catalog = Catalog(repository, ttl_s=3600)
    reads = _counting(repository)

    async def run():
        loop_thread = threading.get_ident()
        for _ in range(100):
            assert catalog.resolve("digits", "")[1] == "2"
        assert reads == []

        _set_default(repo, "1")
        assert catalog.resolve("digits", "")[1] == "2"  # fresh: the snapshot answers
        catalog.ttl_s = 0  # stale from now on
        assert catalog.resolve("digits", "")[1] == "2"  # answered now, read in the background
        reading = catalog._reading
        assert reading is not None
        catalog.resolve("digits", "")
        assert catalog._reading is reading  # one background read at a time
        await reading
        assert reads and loop_thread not in reads
        assert catalog.resolve("digits", "")[1] == "1"

    asyncio.run(run())


def test_load_reads_the_model_again(repo):
    catalog = Catalog(ModelRepository(repo), ttl_s=3600)
    _set_default(repo, "1")
    catalog.refresh("digits")
    assert catalog.resolve("digits", "")[1] == "1"
    shutil.rmtree(repo / "digits")
    catalog.refresh("digits")
    with pytest.raises(NotFound, match="unknown model 'digits'"):
        catalog.get("digits")


def test_a_broken_config_answers_its_error_and_spoils_no_other_model(repo):
    (repo / "typo").mkdir()
    (repo / "typo" / "config.json").write_text('{"name": "typo", "max_batch_sise": 8}')
    catalog = Catalog(ModelRepository(repo), ttl_s=3600)
    with pytest.raises(ConfigError, match=r"typo/config.json: max_batch_sise: unknown field"):
        catalog.resolve("typo", "")
    assert catalog.resolve("digits", "2")[1] == "2"
    assert catalog.known("typo") and not catalog.known("nothing")
    with pytest.raises(NotFound):
        catalog.get("nothing")
    with pytest.raises(InvalidInput):
        catalog.get("../etc")


# --------------------------------------------------- CUDA graph buckets in ModelConfig


def test_graph_and_eager_buckets_go_from_worker_reports_to_model_config(models_dir):
    from meshserve.batcher.core import Batcher, BatcherOptions
    from meshserve.batcher.workers import HeldModel, WorkerPool, WorkerReport
    from meshserve.gateway import convert

    class Link:
        address = "w0"

    pool = WorkerPool()
    pool.add(Link(), max_in_flight=2)
    held = HeldModel("digits", "2", "READY", 0, (1, 2, 4),
                     ((8, "capture failed: RuntimeError: boom"),))
    pool.update("w0", WorkerReport("w0", "cuda:0", (held,), 0, 0, 8, 0), connected=True)
    batcher = Batcher(ModelRepository(models_dir), pool, BatcherOptions())
    state = batcher.version_state(("digits", "2"))
    assert state.state == "READY" and state.workers == ("w0",)
    assert state.graph_buckets == (1, 2, 4) and state.eager_buckets == (8,)
    assert state.reason == "w0 runs batch sizes 8 eagerly (capture failed: RuntimeError: boom)"

    config = ModelRepository(models_dir).config("digits")
    out = convert.model_config(config, graphs=(state.graph_buckets, state.eager_buckets))
    assert out.optimization.cuda.graphs
    assert out.parameters["cuda_graph_batch_sizes"].string_value == "1,2,4"
    assert out.parameters["eager_batch_sizes"].string_value == "8"
    cpu = convert.model_config(config, graphs=((), ()))
    assert not cpu.optimization.cuda.graphs and not cpu.parameters
    assert convert.model_config(config).optimization.cuda.graphs  # not loaded: as configured


def test_an_unreadable_or_non_utf8_config_is_a_config_error(repo):
    (repo / "binary").mkdir()
    (repo / "binary" / "config.json").write_bytes(b"\xff\xfe{}")
    catalog = Catalog(ModelRepository(repo), ttl_s=3600)
    with pytest.raises(ConfigError, match=r"binary/config.json: cannot be read"):
        catalog.get("binary")
    assert catalog.resolve("digits", "1")[1] == "1"
