"""The gateway's RepositoryModelLoad and the prediction cache: invalidated once the batcher
has reloaded, and also when the reload failed (another version may have swapped)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from meshserve.common.errors import FailedPrecondition
from meshserve.common.repository import ModelRepository
from meshserve.gateway.core import Gateway
from meshserve.pb.meshserve.v1 import batcher_pb2
from tests.conftest import MODELS


class FakeBatcher:
    def __init__(self, events: list, error: Exception | None = None):
        self.events, self.error = events, error

    async def load_model(self, model, versions):
        await asyncio.sleep(0)
        self.events.append(("batcher reloaded", model))
        if self.error is not None:
            raise self.error
        return batcher_pb2.ModelStatesResponse(versions=[
            batcher_pb2.ModelVersionState(model=model, version=v, state="READY") for v in ("1", "2")])


class FakeCache:
    def __init__(self, events: list):
        self.events = events

    async def invalidate(self, model, version=""):
        self.events.append(("invalidated", model, version))


@pytest.fixture
def repository(tmp_path):
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    return ModelRepository(tmp_path)


def test_the_cache_is_invalidated_after_the_reload(repository):
    events: list = []
    gateway = Gateway(repository, FakeBatcher(events), FakeCache(events))
    asyncio.run(gateway.load("digits", [], None))
    assert events == [("batcher reloaded", "digits"), ("invalidated", "digits", "1"),
                      ("invalidated", "digits", "2")]


def test_a_failed_reload_still_invalidates_every_version(repository):
    events: list = []
    error = FailedPrecondition("reloading model 'digits' version 2 failed")
    gateway = Gateway(repository, FakeBatcher(events, error), FakeCache(events))
    with pytest.raises(FailedPrecondition, match="version 2 failed"):
        asyncio.run(gateway.load("digits", [], None))
    assert events == [("batcher reloaded", "digits"), ("invalidated", "digits", "")]
