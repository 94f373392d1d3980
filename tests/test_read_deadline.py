"""`ReadDeadline`: one timer for every read of an answer, interrupting only a read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.web.deadline import ReadDeadline


async def chunks(gaps: list[float]) -> AsyncIterator[bytes]:
    """A chunk after each gap (seconds)."""
    for n, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield b"%d" % n


async def read_all(deadline: ReadDeadline, source: AsyncIterator[bytes]) -> list[bytes]:
    found = []
    while True:
        try:
            found.append(await deadline.read(source))
        except StopAsyncIteration:
            return found


async def test_reads_that_end_in_time_get_every_chunk() -> None:
    deadline = ReadDeadline(5)
    try:
        assert await read_all(deadline, chunks([0, 0.01, 0])) == [b"0", b"1", b"2"]
    finally:
        deadline.close()
    assert not deadline.expired


async def test_a_read_still_waiting_at_the_deadline_raises_timeout_error() -> None:
    deadline = ReadDeadline(0.05)
    source = chunks([0, 3])
    try:
        assert await deadline.read(source) == b"0"
        with pytest.raises(TimeoutError):
            await deadline.read(source)  # the chunk due 3 s later never came
    finally:
        deadline.close()
    assert deadline.expired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_deadline_passing_between_reads_spares_the_readers_own_wait() -> None:
    deadline = ReadDeadline(0.02)
    source = chunks([0, 0])
    try:
        assert await deadline.read(source) == b"0"
        await asyncio.sleep(0.1)  # the reader's own work: not interrupted
        with pytest.raises(TimeoutError):
            await deadline.read(source)  # raised at once, though a chunk is ready
    finally:
        deadline.close()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def reader() -> None:
        deadline = ReadDeadline(5)
        try:
            await deadline.read(chunks([30]))
        finally:
            deadline.close()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_from_elsewhere_at_the_deadline_stays_a_cancellation() -> None:
    deadlines: list[ReadDeadline] = []

    async def reader() -> None:
        deadline = ReadDeadline(30)
        deadlines.append(deadline)
        try:
            await deadline.read(chunks([30]))
        finally:
            deadline.close()

    task = asyncio.create_task(reader())
    while not deadlines:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)  # the read is waiting
    # The timer fires and someone else cancels the task in the same turn of the loop.
    deadlines[0]._expire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_closed_deadline_never_fires() -> None:
    deadline = ReadDeadline(0.01)
    deadline.close()
    await asyncio.sleep(0.05)
    assert not deadline.expired
