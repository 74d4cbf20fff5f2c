"""The shared reconnect backoff."""

import asyncio

import pytest

from meshserve.common.backoff import Backoff


def test_doubles_up_to_the_cap_and_resets(monkeypatch):
    slept = []

    async def fake_sleep(s):
        slept.append(s)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    b = Backoff(0.1, 0.5)

    async def run():
        for _ in range(4):
            await b.wait()
        b.reset()
        await b.wait()

    asyncio.run(run())
    assert slept == [0.1, 0.2, 0.4, 0.5, 0.1]


def test_rejects_a_bad_range():
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
