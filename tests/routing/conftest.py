"""A mesh for routing tests, every service its own process: a repository in tmp with
`digits` (versions 1, 2), `digits_small` (a copy of digits, version 1) and `wide` (a config
with other inputs, for validation); worker A serves digits, worker B serves digits_small.

Pinning: worker B's own repository holds only digits_small, so it cannot take digits when
worker A dies (the batcher's load there fails, and digits answers UNAVAILABLE). The batcher
is started without --load; it learns the placement from the workers' reports (--load on each
worker). Two gateways share policies through Redis, two through the batcher's RoutingStore."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import MODELS, RedisServer, ServiceProcess


def make_repository(root):
    repo = root / "repo"
    repo.mkdir()
    shutil.copytree(MODELS / "digits", repo / "digits")
    small = repo / "digits_small"
    small.mkdir()
    shutil.copytree(MODELS / "digits" / "1", small / "1")
    config = json.loads((MODELS / "digits" / "config.json").read_text())
    config.update(name="digits_small", default_version="1")
    (small / "config.json").write_text(json.dumps(config))
    wide = repo / "wide"
    wide.mkdir()
    config = json.loads((MODELS / "digits" / "config.json").read_text())
    config.update(name="wide", inputs=[{"name": "input", "datatype": "FP32", "dims": [32]}])
    config.pop("default_version")
    (wide / "config.json").write_text(json.dumps(config))
    only_small = root / "repo_small"
    only_small.mkdir()
    shutil.copytree(small, only_small / "digits_small")
    return repo, only_small


class RoutingMesh:
    def __init__(self, tmp):
        self.repo, repo_small = make_repository(tmp)
        self.redis = RedisServer(tmp)
        self.redis.start()
        internal = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
        worker = [*internal, "--device", "cpu", "--threads", "1"]
        self.worker_a = ServiceProcess(
            "model_worker", [*worker, "--model-repository", str(self.repo), "--load", "digits"],
            tmp)
        self.worker_b = ServiceProcess(
            "model_worker", [*worker, "--model-repository", str(repo_small),
                             "--load", "digits_small"], tmp)
        self.worker_a.wait_ready()
        self.worker_b.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *internal, "--model-repository", str(self.repo),
            "--workers", f"{self.worker_a.address},{self.worker_b.address}"], tmp)
        self.batcher.wait_ready()
        gateway = [*internal, "--model-repository", str(self.repo),
                   "--batcher", self.batcher.address, "--async-runners", "0"]
        self.gateways_redis = [
            ServiceProcess("gateway", [*gateway, "--redis-url", self.redis.url], tmp,
                           env={"REDIS_URL": ""})
            for _ in range(2)]
        self.gateways_batcher = [
            ServiceProcess("gateway", gateway, tmp, env={"REDIS_URL": ""}) for _ in range(2)]
        for g in self.gateways:
            g.wait_ready()

    @property
    def gateways(self):
        return [*self.gateways_redis, *self.gateways_batcher]

    @property
    def url(self) -> str:
        return self.gateways_redis[0].address

    def stop(self) -> None:
        for proc in [*self.gateways, self.batcher, self.worker_a, self.worker_b]:
            proc.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = RoutingMesh(tmp_path_factory.mktemp("routing"))
    yield m
    m.stop()
