"""Exponential backoff between retries of a connection or a start-up check: the one way
services wait before trying again (never a poll of something that can notify)."""

from __future__ import annotations

import asyncio


class Backoff:
    """Waits first_s, then twice as long each time, up to max_s; reset() after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0):
        if not 0 < first_s <= max_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got {first_s}, {max_s}")
        self.first_s, self.max_s = first_s, max_s
        self.delay_s = first_s  # the next wait

    def reset(self) -> None:
        self.delay_s = self.first_s

    async def wait(self) -> None:
        delay_s, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_s)
        await asyncio.sleep(delay_s)
