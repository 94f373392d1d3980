"""The spool: small answers in memory, large ones on disk, the same bytes back either way."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator
from typing import IO, Any, cast

import pytest

from proxy.web.spool import Spool


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
