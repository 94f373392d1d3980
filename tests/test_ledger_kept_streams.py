"""Live streams kept for repeats, on both backends: a stream kept as it goes (its chunks
appended while the first attempt streams), read back by a repeat that follows it, within
`store_bytes` with the other kept answers, forgotten with them; schema version 8."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.ledger import open_ledger
from proxy.ledger.base import Backend
from proxy.ledger.kept import KeptAnswer
from tests import pg
from tests.test_ledger_repeats import HEADERS, MB, answer, kept, reserve

EVENTS = [
    b'event: image_generation.partial_image\ndata: {"partial_image_index": 0}\n\n',
    b'event: image_generation.partial_image\ndata: {"partial_image_index": 1}\n\n',
    b'event: image_generation.completed\ndata: {"b64_json": "\xff\x00"}\n\n',
]


def live(request_id: str, kept_at: float = 1000.0, team: str = "design") -> KeptAnswer:
    """The head of a stream kept as it goes: no body yet."""
    return KeptAnswer(request_id, team, 200, HEADERS, b"", True, kept_at, live=True)


async def chunks(ledger: Backend, request_id: str) -> list[bytes]:
    """The chunks of `request_id` as stored, in order."""
    found: list[tuple[int, bytes]] = []
    async for columns, rows in ledger.dump("kept_chunks"):
        at, seq, body = (columns.index(c) for c in ("request_id", "seq", "body"))
        found += [(r[seq], bytes(r[body])) for r in rows if r[at] == request_id]
    return [body for _, body in sorted(found)]


async def test_a_live_stream_is_read_as_it_grows_then_whole(ledger: Backend) -> None:
    assert await ledger.keep_answer(live("r1"), 10 * MB)
    tail = await ledger.kept_tail("r1", -1)
    assert tail is not None and tail.answer == live("r1") and tail.seq == -1
    assert await ledger.append_chunk("r1", 0, EVENTS[0], 1001.0, 10 * MB)
    assert await ledger.append_chunk("r1", 1, EVENTS[1], 1002.0, 10 * MB)
    tail = await ledger.kept_tail("r1", -1)
    assert tail is not None and (tail.answer.body, tail.seq) == (EVENTS[0] + EVENTS[1], 1)
    assert tail.answer.live and tail.answer.kept_at == 1002.0
    assert await ledger.append_chunk("r1", 2, EVENTS[2], 1003.0, 10 * MB)
    tail = await ledger.kept_tail("r1", 1)  # a repeat reads what came since
    assert tail is not None and (tail.answer.body, tail.seq, tail.answer.live) == (
        EVENTS[2], 2, True,
    )  # fmt: skip
    assert await ledger.end_stream("r1")
    tail = await ledger.kept_tail("r1", 2)
    assert tail is not None and (tail.answer.body, tail.seq, tail.answer.live) == (b"", 2, False)
    whole = await ledger.kept_answer("r1")
    assert whole == replace(live("r1", 1003.0), body=b"".join(EVENTS), live=False)
    assert await kept(ledger) == {"r1": len(b"".join(EVENTS))}
    assert not await ledger.end_stream("r1")  # ended once
    assert not await ledger.append_chunk("r1", 3, b"late", 1004.0, 10 * MB)
    assert await ledger.kept_tail("r1", -1) is None  # a chunk after the end forgets it


async def test_a_whole_answer_is_read_from_the_start_with_its_body(ledger: Backend) -> None:
    whole = answer("r1", 300)
    assert await ledger.keep_answer(whole, MB)
    tail = await ledger.kept_tail("r1", -1)
    assert tail is not None and (tail.answer, tail.seq) == (whole, -1)


async def test_nothing_is_kept_for_a_stream_never_begun(ledger: Backend) -> None:
    assert await ledger.kept_tail("r1", -1) is None
    assert not await ledger.append_chunk("r1", 0, EVENTS[0], 1000.0, 10 * MB)
    assert not await ledger.end_stream("r1")
    assert await chunks(ledger, "r1") == []


async def test_a_stream_outgrowing_the_store_is_forgotten(ledger: Backend) -> None:
    assert await ledger.keep_answer(answer("other", 300, kept_at=999.0), 1000)
    assert await ledger.keep_answer(live("r1"), 1000)
    assert await ledger.append_chunk("r1", 0, b"x" * 600, 1001.0, 1000)
    assert await kept(ledger) == {"other": 300, "r1": 600}
    assert await ledger.append_chunk("r1", 1, b"y" * 300, 1002.0, 1000)
    assert await kept(ledger) == {"r1": 900}, "the older answer made room"
    assert not await ledger.append_chunk("r1", 2, b"z" * 101, 1003.0, 1000)
    assert await kept(ledger) == {}
    assert await chunks(ledger, "r1") == []
    assert await ledger.kept_tail("r1", -1) is None


async def test_a_live_stream_is_forgotten_to_make_room_for_newer_answers(
    ledger: Backend,
) -> None:
    assert await ledger.keep_answer(live("r1"), 1000)
    assert await ledger.append_chunk("r1", 0, b"x" * 600, 1001.0, 1000)
    assert await ledger.keep_answer(answer("r2", 500, kept_at=1002.0), 1000)
    assert await kept(ledger) == {"r2": 500}
    assert await chunks(ledger, "r1") == [], "its chunks go with it"
    assert not await ledger.append_chunk("r1", 1, b"y", 1003.0, 1000)


async def test_a_stream_that_broke_off_is_forgotten_with_its_chunks(ledger: Backend) -> None:
    assert await ledger.keep_answer(live("r1"), MB)
    assert await ledger.append_chunk("r1", 0, EVENTS[0], 1001.0, MB)
    await ledger.forget_answer("r1")
    assert await ledger.kept_tail("r1", -1) is None
    assert await ledger.kept_answer("r1") is None
    assert await chunks(ledger, "r1") == []
    await ledger.forget_answer("r1")  # nothing left: nothing happens


async def test_streams_are_forgotten_with_the_window_as_they_were_last_kept(
    ledger: Backend,
) -> None:
    assert await ledger.keep_answer(live("old", kept_at=1000.0), MB)
    assert await ledger.append_chunk("old", 0, EVENTS[0], 1001.0, MB)
    assert await ledger.keep_answer(live("going", kept_at=1000.0), MB)
    assert await ledger.append_chunk("going", 0, EVENTS[0], 1010.0, MB)
    assert await ledger.forget_answers(1005.0) == 1
    assert sorted(await kept(ledger)) == ["going"]
    assert await chunks(ledger, "old") == []
    assert await chunks(ledger, "going") == [EVENTS[0]]


async def test_keeping_an_answer_again_replaces_a_live_stream(ledger: Backend) -> None:
    assert await ledger.keep_answer(live("r1"), MB)
    assert await ledger.append_chunk("r1", 0, EVENTS[0], 1001.0, MB)
    again = live("r1", 1002.0)
    assert await ledger.keep_answer(again, MB)
    assert await ledger.kept_answer("r1") == again
    assert await chunks(ledger, "r1") == []


async def test_a_held_background_response_is_a_first_attempt_held(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0, key="key-1")
    first = await ledger.first_attempt("design", 900.0, key="key-1")
    assert first is not None and not first.held
    await ledger.hold("r1", "resp_1")
    first = await ledger.first_attempt("design", 900.0, key="key-1")
    assert first is not None and first.held and not first.settled


async def test_measure_appending_and_following_a_stream(ledger: Backend) -> None:
    """Measured, not asserted: what an event costs the first attempt, and a repeat's read."""
    event = b"event: response.output_text.delta\ndata: " + b"x" * 200 + b"\n\n"
    assert await ledger.keep_answer(live("r1"), 10 * MB)
    appends, reads = [], []
    for seq in range(200):
        began = time.perf_counter()
        assert await ledger.append_chunk("r1", seq, event, 1000.0 + seq, 10 * MB)
        appends.append(time.perf_counter() - began)
        began = time.perf_counter()
        tail = await ledger.kept_tail("r1", seq - 1)
        reads.append(time.perf_counter() - began)
        assert tail is not None and tail.answer.body == event
    print(
        f"\n{type(ledger).__name__}: append an event {statistics.median(appends) * 1000:.2f} ms "
        f"median, read the next {statistics.median(reads) * 1000:.2f} ms median"
    )


# -- replicas following and appending together ----------------------------------------------


async def test_a_replica_follows_a_stream_another_appends(shared: str) -> None:
    """The first attempt's replica appends; another's repeat reads each chunk once, in
    order, then the end."""
    count = 40

    async def append() -> None:
        replica = await open_ledger(shared)
        try:
            assert await replica.keep_answer(live("r1"), 10 * MB)
            for seq in range(count):
                await asyncio.sleep(0.005)
                assert await replica.append_chunk("r1", seq, b"%d;" % seq, 1000.0 + seq, 10 * MB)
            assert await replica.end_stream("r1")
        finally:
            await replica.close()

    async def follow() -> bytes:
        replica = await open_ledger(shared)
        got, seq = b"", -1
        try:
            for _ in range(100_000):
                tail = await replica.kept_tail("r1", seq)
                if tail is None:
                    await asyncio.sleep(0.001)
                    continue
                got, seq = got + tail.answer.body, tail.seq
                if not tail.answer.live:
                    return got
            raise AssertionError("the stream never ended")
        finally:
            await replica.close()

    appended, followed = await asyncio.gather(
        asyncio.to_thread(pg.run, append()), asyncio.to_thread(pg.run, follow())
    )
    assert appended is None
    assert followed == b"".join(b"%d;" % i for i in range(count))


async def test_replicas_appending_together_stay_within_the_store(shared: str) -> None:
    store, replicas, each = 3 * MB, 4, 8

    async def stream(k: int) -> None:
        replica = await open_ledger(shared)
        try:
            assert await replica.keep_answer(live(f"r{k}", 1000.0 + k), store)
            for seq in range(each):
                # Kept or forgotten to make room: never beyond the store.
                await replica.append_chunk(f"r{k}", seq, b"x" * (MB // 4), 1000.0 + seq, store)
        finally:
            await replica.close()

    await asyncio.gather(*(asyncio.to_thread(pg.run, stream(k)) for k in range(replicas)))
    [found] = pg.fetch(shared, "SELECT coalesce(sum(size), 0) AS s FROM kept_answers")
    [stored] = pg.fetch(shared, "SELECT coalesce(sum(length(body)), 0) AS s FROM kept_chunks")
    assert 0 < found["s"] <= store
    assert stored["s"] == found["s"], "no chunk outlives its answer"


# -- schema version 8 ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_6_ledger_migrates_and_keeps_live_streams(
    kind: str, tmp_path: Path
) -> None:
    blob = "X'616263'" if kind == "sqlite" else "'abc'::bytea"
    whole = (
        "INSERT INTO kept_answers (request_id, team, status, headers, body, stream, size, "
        f"kept_at) VALUES ('old', 'design', 200, '[]', {blob}, 0, 3, 100.0)"
    )
    async with pg.migrated_from(kind, tmp_path, 6, whole) as ledger:
        old = await ledger.kept_answer("old")
        assert old is not None and (old.body, old.live) == (b"abc", False)
        assert await ledger.keep_answer(live("new"), MB)
        assert await ledger.append_chunk("new", 0, EVENTS[0], 101.0, MB)
        tail = await ledger.kept_tail("new", -1)
        assert tail is not None and tail.answer.body == EVENTS[0]
