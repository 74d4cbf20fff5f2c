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
