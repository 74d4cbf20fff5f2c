"""The whole mesh, every service its own process, with a real Redis behind the cache."""

from __future__ import annotations

import pytest

from tests.conftest import MODELS, RedisServer, ServiceProcess


class Mesh:
    def __init__(self, tmp, workers: int = 1, models=MODELS, load: str = "digits"):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.redis.start()
        internal = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
        self.cache = ServiceProcess("cache", [*internal, "--redis-url", self.redis.url], tmp)
        self.workers = [
            ServiceProcess("model_worker", [*internal, "--device", "cpu",
                                            "--model-repository", str(models)], tmp)
            for _ in range(workers)
        ]
        self.cache.wait_ready()
        for w in self.workers:
            w.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *internal, "--model-repository", str(models), "--load", load,
            "--workers", ",".join(w.address for w in self.workers)], tmp)
        self.batcher.wait_ready()
        self.gateway = ServiceProcess("gateway", [
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--model-repository", str(models), "--batcher", self.batcher.address,
            "--cache", self.cache.address], tmp)
        self.gateway.wait_ready()

    @property
    def url(self) -> str:
        return self.gateway.address

    def stop(self) -> None:
        for proc in [self.gateway, self.batcher, *self.workers, self.cache]:
            proc.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()
