"""What a stream's `Recorder` holds while its answer is not yet sure to be kept (its
client still reads it, and it carried no `Idempotency-Key`): the events so far, which
it keeps if the client goes before the end. Every SDK stream is repeatable (its retry
count is sent from 0), so every one holds them; they are held as an answer being read
is (`proxy.web.spool`): past a few KiB in the process's shared spool memory, and on disk
when that has no room, never all of a stream in memory for each of thousands."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.core.errors import LedgerError
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend
from proxy.ledger.kept import KeptAnswer
from proxy.web.kept_streams import Recorder
from proxy.web.spool import SpoolMemory
from tests import pg
from tests.test_ledger_repeats import HEADERS, MB

CHUNK = 64 * 1024
EVENTS = 64
"""A stream of 4 MiB, in events of 64 KiB (each a new bytes object)."""


@dataclass
class Runtime:
    """What a `Recorder` uses of its runtime."""

    ledger: Backend
    spools: SpoolMemory
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def clock(self) -> float:
        return 1000.0

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        return task


@pytest.fixture
async def ledger(tmp_path: Any) -> AsyncIterator[Backend]:
    opened = await open_ledger(pg.ledger_url("sqlite", tmp_path))
    yield opened
    await opened.close()


def event(i: int) -> bytes:
    return bytes([i % 256]) * CHUNK


def recorder(ledger: Backend, spools: SpoolMemory) -> Recorder:
    head = KeptAnswer("r1", "design", 200, HEADERS, b"", True, 0.0)
    return Recorder(Runtime(ledger, spools), head, 256 * MB)  # type: ignore[arg-type]


async def test_a_stream_not_yet_kept_holds_its_events_within_the_spool_memory(
    ledger: Backend,
) -> None:
    recording = recorder(ledger, SpoolMemory(limit=0))  # no shared room: to disk
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(EVENTS):
            recording.put(event(i), False)  # its client reads on
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1 * MB, f"{held} bytes held in memory for a stream of {EVENTS * CHUNK}"
    await recording.end(False)  # read to its end by its client: nothing kept
    assert await ledger.kept_answer("r1") is None


async def test_a_stream_whose_client_left_keeps_every_event_in_order(ledger: Backend) -> None:
    spools = SpoolMemory(limit=1 * MB)
    recording = recorder(ledger, spools)
    for i in range(EVENTS // 2):
        recording.put(event(i), False)
    for i in range(EVENTS // 2, EVENTS):
        recording.put(event(i), True)  # its client is gone: kept from now on
    await recording.end(True)
    whole = await ledger.kept_answer("r1")
    assert whole is not None and not whole.live
    assert whole.body == b"".join(event(i) for i in range(EVENTS))
    assert spools.held == 0  # what it held of the shared memory is given back


async def test_a_stream_not_kept_gives_its_spool_memory_back(ledger: Backend) -> None:
    spools = SpoolMemory(limit=8 * MB)
    for ending in ("end", "abandon"):
        recording = recorder(ledger, spools)
        for i in range(EVENTS):
            recording.put(event(i), False)
        await (recording.end(False) if ending == "end" else recording.abandon())
        assert spools.held == 0, ending
        assert await ledger.kept_answer("r1") is None


async def test_a_stream_the_ledger_cannot_keep_gives_its_spool_memory_back_at_once(
    ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not when the stream ends, which may be minutes later: the room is other answers'."""

    async def down(*args: Any) -> None:
        raise LedgerError("the ledger is down")

    monkeypatch.setattr(ledger, "keep_answer", down)
    spools = SpoolMemory(limit=8 * MB)
    recording = recorder(ledger, spools)
    for i in range(EVENTS // 2):
        recording.put(event(i), False)
    assert spools.held > 0
    recording.put(event(0), True)  # its client is gone: kept from now on, or tried to be
    assert recording.writer is not None
    await asyncio.wait_for(asyncio.shield(recording.writer), 10)
    for i in range(EVENTS // 2, EVENTS):
        recording.put(event(i), True)  # the stream goes on
    assert spools.held == 0
    await recording.end(True)
    assert spools.held == 0
