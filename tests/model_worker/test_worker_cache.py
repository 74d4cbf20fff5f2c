"""The model cache: LRU eviction by count and bytes, in-flight protection, shared loads,
unload waiting for batches, status changes."""

from __future__ import annotations

import asyncio
import threading

import pytest
from worker_models import mlp_config, run_async, save_mlp, write_config

from meshserve.common.errors import InvalidInput, NotFound, Overloaded
from meshserve.common.repository import ModelRepository
from meshserve.model_worker.models import ModelCache, load_model

SIZE = (4 * 5 + 5 + 5 * 3 + 3) * 4  # bytes of save_mlp's default network


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    for name in ("a", "b", "c"):
        folder = write_config(tmp_path, name, mlp_config())
        save_mlp(folder / "1" / "model.pth")
        save_mlp(folder / "2" / "model.pth", seed=2)
    return ModelRepository(tmp_path)


def names(cache):
    return [f"{m.model}:{m.version}" for m in cache.models()]


@run_async
async def test_lru_evicts_the_least_recently_used_by_count(repo):
    cache = ModelCache(repo, "cpu", max_models=2)
    await cache.load("a", "1")
    await cache.load("b", "1")
    cache.release(cache.acquire("a", "1", "w"))  # a is now the most recently used
    await cache.load("c", "1")
    assert names(cache) == ["a:1", "c:1"]
    with pytest.raises(NotFound, match="model b version 1 is not loaded on worker w"):
        cache.acquire("b", "1", "w")


@run_async
async def test_lru_evicts_by_bytes(repo):
    cache = ModelCache(repo, "cpu", max_models=8, max_memory_bytes=2 * SIZE)
    await cache.load("a", "1")
    await cache.load("a", "2")
    assert cache.memory_used_bytes == 2 * SIZE
    await cache.load("b", "1")
    assert names(cache) == ["a:2", "b:1"] and cache.memory_used_bytes == 2 * SIZE


@run_async
async def test_a_model_with_batches_in_flight_is_never_evicted(repo):
    cache = ModelCache(repo, "cpu", max_models=2)
    await cache.load("a", "1")
    await cache.load("b", "1")
    held_a = cache.acquire("a", "1", "w")
    held_b = cache.acquire("b", "1", "w")
    with pytest.raises(Overloaded, match=r"a:1 .*1 batches in flight.*b:1"):
        await cache.load("c", "1")
    assert names(cache) == ["a:1", "b:1"]
    cache.release(held_a)
    await cache.load("c", "1")  # a is idle now: it goes, b (in flight) stays
    assert names(cache) == ["b:1", "c:1"]
    cache.release(held_b)


@run_async
async def test_a_model_larger_than_the_budget_fails_without_evicting(repo):
    cache = ModelCache(repo, "cpu", max_models=8, max_memory_bytes=SIZE - 1)
    with pytest.raises(Overloaded, match="more than the worker's whole"):
        await cache.load("a", "1")
    assert cache.models() == ()


@run_async
async def test_loading_twice_is_a_no_op_and_concurrent_loads_share_one(repo):
    calls = []
    gate = threading.Event()

    def loader(*args):
        calls.append(args[:1])
        gate.wait(10)
        return load_model(*args)

    changes = []
    cache = ModelCache(repo, "cpu", max_models=4, loader=loader,
                       on_change=lambda: changes.append(names(cache)))
    first = asyncio.ensure_future(cache.load("a", "1"))
    second = asyncio.ensure_future(cache.load("a", "01"))
    await asyncio.sleep(0.05)
    assert [m.state for m in cache.models()] == ["LOADING"]
    gate.set()
    infos = await asyncio.gather(first, second)
    assert infos[0] == infos[1] and infos[0].state == "READY"
    await cache.load("a", "1")
    assert len(calls) == 1 and len(changes) == 2  # load start, ready


@run_async
async def test_unload_waits_for_in_flight_batches(repo):
    cache = ModelCache(repo, "cpu", max_models=4)
    await cache.load("a", "1")
    held = cache.acquire("a", "1", "w")
    unload = asyncio.ensure_future(cache.unload("a", "1"))
    await asyncio.sleep(0.05)
    assert not unload.done()
    with pytest.raises(NotFound, match="unloading"):  # new batches are refused meanwhile
        cache.acquire("a", "1", "w")
    cache.release(held)
    await asyncio.wait_for(unload, 10)
    assert cache.models() == ()
    with pytest.raises(NotFound):
        await cache.unload("a", "1")


@run_async
async def test_load_errors_are_clear(repo, tmp_path):
    cache = ModelCache(repo, "cpu", max_models=4)
    with pytest.raises(NotFound, match="no version 3"):
        await cache.load("a", "3")
    with pytest.raises(NotFound, match="not in the model repository"):
        await cache.load("zzz", "1")
    with pytest.raises(InvalidInput, match="invalid model name"):
        await cache.load("../a", "1")
    (tmp_path / "a" / "1" / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="model.pth"):
        await cache.load("a", "1")
    assert cache.models() == ()  # a failed load leaves nothing behind


def test_compute_threads_use_the_process_thread_count(models_dir):
    """OpenMP thread counts are per thread: every compute thread gets --threads, not one
    thread per core (which would oversubscribe the cores the rest of the mesh needs)."""
    import torch

    from meshserve.model_worker.worker import Worker

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = Worker(ModelRepository(models_dir), worker_id="w", device="cpu", max_in_flight=2)
        counts = {worker._pool.submit(torch.get_num_threads).result() for _ in range(4)}
        worker.close()
    finally:
        torch.set_num_threads(before)
    assert counts == {1}


# ------------------------------------------------------------------------------ reload


def outputs_of(model, x):
    (out,), _ = model.runner.run([x])
    return out


@run_async
async def test_reload_swaps_in_the_new_files_and_running_batches_finish_on_the_old(repo,
                                                                                   tmp_path):
    import torch

    x = torch.rand(2, 4)
    cache = ModelCache(repo, "cpu", max_models=4)
    await cache.load("a", "1")
    running = cache.acquire("a", "1", "w")  # a batch in flight across the reload
    new_net = save_mlp(tmp_path / "a" / "1" / "model.pth", seed=7)
    info = await cache.reload("a", "1")
    assert info.state == "READY" and names(cache) == ["a:1"]
    swapped = cache.acquire("a", "1", "w")
    assert swapped is not running
    with torch.inference_mode():
        assert torch.allclose(outputs_of(swapped, x), new_net(x))
        assert not torch.allclose(outputs_of(running, x), new_net(x))
    cache.release(swapped)
    # The unload waits for the batch still running on the previous files.
    unload = asyncio.ensure_future(cache.unload("a", "1"))
    await asyncio.sleep(0.05)
    assert not unload.done()
    cache.release(running)
    await asyncio.wait_for(unload, 10)
    assert cache.models() == ()


@run_async
async def test_batches_run_on_the_previous_files_until_the_swap_and_reloads_share_one(repo):
    calls = []
    gate = threading.Event()

    def loader(*args):
        calls.append(args[2])
        if len(calls) > 1:
            gate.wait(10)
        return load_model(*args)

    cache = ModelCache(repo, "cpu", max_models=4, loader=loader)
    await cache.load("a", "1")
    before = cache.acquire("a", "1", "w")
    cache.release(before)
    first = asyncio.ensure_future(cache.reload("a", "1"))
    second = asyncio.ensure_future(cache.reload("a", "01"))
    await asyncio.sleep(0.05)
    during = cache.acquire("a", "1", "w")
    assert during is before and [m.state for m in cache.models()] == ["READY"]
    cache.release(during)
    gate.set()
    await asyncio.gather(first, second)
    assert calls == ["1", "1"]  # the load, then one reload for both callers
    after = cache.acquire("a", "1", "w")
    assert after is not before
    cache.release(after)


@run_async
async def test_a_failed_reload_keeps_the_previous_files_serving(repo, tmp_path):
    cache = ModelCache(repo, "cpu", max_models=4)
    await cache.load("a", "1")
    before = cache.acquire("a", "1", "w")
    cache.release(before)
    (tmp_path / "a" / "1" / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="model.pth"):
        await cache.reload("a", "1")
    again = cache.acquire("a", "1", "w")
    assert again is before and [m.state for m in cache.models()] == ["READY"]
    cache.release(again)


@run_async
async def test_reload_of_a_version_not_loaded_loads_it(repo):
    cache = ModelCache(repo, "cpu", max_models=4)
    info = await cache.reload("b", "2")
    assert info.state == "READY" and names(cache) == ["b:2"]
