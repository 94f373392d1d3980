"""The deadline of an answer's reads, on one timer for all of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class ReadDeadline:
    """Reads from an answer's chunks until `left_s` from now, then TimeoutError.

        deadline = ReadDeadline(left_s)       # in the task that reads
        try:
            chunk = await deadline.read(chunks)
            ...
        finally:
            deadline.close()

    `asyncio.timeout` around each read set a timer and cancelled it for every read, about
    5 µs each (a 2 MB answer comes in about thirty); this timer is set once. It cancels the
    task only while one of its reads waits, so the cancellation always lands in that read,
    never in whatever the reader awaits between two; when it fires between reads, the next
    read raises at once. A cancellation from elsewhere stays a cancellation (as with
    `asyncio.timeout`, whose rule for telling them apart this follows).
    """

    __slots__ = ("_cancelled", "_handle", "_reading", "_task", "expired")

    def __init__(self, left_s: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a deadline is for the task that reads"
        self._task = task
        self._reading = False
        self._cancelled = False
        self.expired = False
        self._handle = loop.call_at(loop.time() + left_s, self._expire)

    async def read(self, chunks: AsyncIterator[bytes]) -> bytes:
        """The next chunk (StopAsyncIteration at the end), or TimeoutError once the
        deadline has passed."""
        if self.expired:
            raise TimeoutError
        task = self._task
        cancelling = task.cancelling()
        self._reading = True
        try:
            return await anext(chunks)
        except asyncio.CancelledError:
            if self._cancelled and task.uncancel() <= cancelling:
                self._cancelled = False
                raise TimeoutError from None
            raise
        finally:
            self._reading = False

    def close(self) -> None:
        self._handle.cancel()

    def _expire(self) -> None:
        self.expired = True
        if self._reading:
            self._cancelled = True
            self._task.cancel()
