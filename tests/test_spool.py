"""The spool: small answers in memory, large ones on disk, the same bytes back either way."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator
from typing import IO, Any, cast

import pytest

from proxy.web.responses import HeldResponse
from proxy.web.spool import CHUNK, Spool, SpoolMemory


@pytest.fixture
def opened_files(monkeypatch: pytest.MonkeyPatch) -> list[IO[bytes]]:
    """Every temporary file the spool opens, to check that it is closed."""
    files: list[IO[bytes]] = []
    original = tempfile.TemporaryFile

    def temporary_file(*args: Any, **kwargs: Any) -> IO[bytes]:
        handle: IO[bytes] = original(*args, **kwargs)
        files.append(handle)
        return handle

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    return files


async def read_all(spool: Spool) -> bytes:
    return b"".join([chunk async for chunk in spool.stream()])


async def test_small_body_stays_in_memory_and_comes_back_whole(
    opened_files: list[IO[bytes]],
) -> None:
    spool = Spool(threshold=100)
    for chunk in (b"abc", b"", b"defg"):
        spool.write(chunk)
    assert spool.in_memory
    assert spool.size == 7
    assert spool.getvalue() == b"abcdefg"
    assert await read_all(spool) == b"abcdefg"
    assert opened_files == []


def test_body_of_exactly_the_threshold_stays_in_memory() -> None:
    spool = Spool(threshold=10)
    spool.write(b"x" * 10)
    assert spool.in_memory


async def test_body_over_the_threshold_moves_to_a_file_and_streams_the_same_bytes(
    opened_files: list[IO[bytes]],
) -> None:
    data = bytes(range(256)) * 3000  # 768,000 bytes: several read chunks
    spool = Spool(threshold=1000)
    for start in range(0, len(data), 777):
        spool.write(data[start : start + 777])
    assert not spool.in_memory
    assert spool.size == len(data)
    assert len(opened_files) == 1
    assert await read_all(spool) == data


async def test_file_is_closed_after_streaming(opened_files: list[IO[bytes]]) -> None:
    spool = Spool(threshold=4)
    spool.write(b"0123456789")
    await read_all(spool)
    assert opened_files[0].closed


async def test_file_is_closed_when_the_reader_stops_early(opened_files: list[IO[bytes]]) -> None:
    spool = Spool(threshold=4)
    spool.write(b"x" * 600_000)
    stream = cast(AsyncGenerator[bytes, None], spool.stream())
    assert await stream.__anext__()
    await stream.aclose()
    assert opened_files[0].closed


def test_close_is_idempotent(opened_files: list[IO[bytes]]) -> None:
    spool = Spool(threshold=4)
    spool.write(b"0123456789")
    spool.close()
    spool.close()
    assert opened_files[0].closed


def test_getvalue_refuses_a_body_on_disk() -> None:
    spool = Spool(threshold=1)
    spool.write(b"abc")
    with pytest.raises(AssertionError):
        spool.getvalue()
    spool.close()


async def test_shared_memory_keeps_a_large_body_off_disk_and_is_given_back_once_sent(
    opened_files: list[IO[bytes]],
) -> None:
    memory = SpoolMemory(limit=1000)
    spool = Spool(threshold=100, memory=memory)
    data = bytes(range(256)) * 4
    for start in range(0, len(data), 300):
        spool.write(data[start : start + 300])
    assert spool.in_memory and not spool.small
    assert memory.held == len(data) - 100
    assert await read_all(spool) == data
    assert memory.held == 0
    assert opened_files == []


async def test_a_body_that_finds_no_room_goes_to_disk_and_gives_its_share_back(
    opened_files: list[IO[bytes]],
) -> None:
    memory = SpoolMemory(limit=500)
    first, second = Spool(threshold=100, memory=memory), Spool(threshold=100, memory=memory)
    first.write(b"a" * 400)
    second.write(b"b" * 300)
    assert memory.held == 500
    second.write(b"b" * 1)  # no room left: to disk, and its 200 bytes given back
    assert not second.in_memory and memory.held == 300
    assert await read_all(second) == b"b" * 301
    first.write(b"a" * 300)  # past its room too
    assert not first.in_memory and memory.held == 0
    first.close()
    assert len(opened_files) == 2 and all(f.closed for f in opened_files)


def test_a_spool_never_sent_gives_its_share_back_when_dropped() -> None:
    memory = SpoolMemory(limit=1000)
    spool = Spool(threshold=10, memory=memory)
    spool.write(b"x" * 500)
    assert memory.held == 490
    del spool
    assert memory.held == 0


async def test_small_chunks_in_memory_are_sent_joined() -> None:
    spool = Spool(threshold=10, memory=SpoolMemory())
    for _ in range(CHUNK // 1024 * 3):
        spool.write(b"z" * 1024)
    sent = [chunk async for chunk in spool.stream()]
    assert [len(chunk) for chunk in sent] == [CHUNK] * 3


def held_spool(memory: SpoolMemory, chunks: list[bytes]) -> Spool:
    spool = Spool(threshold=100, memory=memory)
    for chunk in chunks:
        spool.write(chunk)
    assert spool.in_memory and not spool.small
    return spool


async def test_an_answer_held_in_memory_is_sent_whole_and_counted_until_drained() -> None:
    memory = SpoolMemory(limit=10_000)
    chunks = [b"a" * 90, b"b" * 300, b"c" * 7]
    spool = held_spool(memory, chunks)
    response = HeldResponse(spool, 200, {"content-length": "397", "x-kept": "1"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        # While the body is being sent, its memory still counts against the process.
        sent.append({**message, "held": memory.held})

    await response({"type": "http"}, _no_receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", *["http.response.body"] * 2]
    assert sent[0]["status"] == 200
    assert (b"content-length", b"397") in sent[0]["headers"]
    assert (b"x-kept", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == b"".join(chunks) and sent[1]["more_body"]
    # The last message waits for the server's buffer to drain: the memory counts till then.
    assert (sent[2]["body"], sent[2]["more_body"]) == (b"", False)
    assert sent[1]["held"] == sent[2]["held"] == 297
    assert memory.held == 0


async def test_an_answer_held_in_memory_gives_its_share_back_when_the_send_fails() -> None:
    memory = SpoolMemory(limit=10_000)
    response = HeldResponse(held_spool(memory, [b"x" * 500]), 200, {"content-length": "500"})

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")

    with pytest.raises(OSError):
        await response({"type": "http"}, _no_receive, send)
    assert memory.held == 0


async def _no_receive() -> dict[str, Any]:
    raise AssertionError("a held answer reads nothing from the client")
