"""A bounded-memory buffer for upstream answers that must be read before they are sent.

The cost header needs `usage`, which comes at the end of a multi-megabyte answer,
so a non-streamed answer is held until it is metered. Its first `threshold` bytes are
held in memory; past them it takes what more it needs from the process's `SpoolMemory`
(64 MiB shared by every answer being read or sent), and when that has no room it moves
to an anonymous temporary file. So a few dozen 2 MB answers at a time are never written
to disk and read back (about a tenth of their CPU), while thousands of answers in flight
(or slow readers) cost disk, not memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import IO

CHUNK = 256 * 1024
SPOOL_MEMORY = 64 * 1024 * 1024


class SpoolMemory:
    """The bytes that one process's spools hold in memory past their own `threshold`,
    together, and the most they may: an answer that finds no room goes to disk."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int = SPOOL_MEMORY) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, if there is room."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class Spool:
    # Small enough that 2,000 answers being read at once hold ~128 MiB at most.
    def __init__(self, threshold: int = 64 * 1024, memory: SpoolMemory | None = None) -> None:
        self._threshold = threshold
        self._memory = memory
        self._taken = 0  # held in `memory`, past the threshold
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._chunks.append(chunk)
        if self.size > self._threshold:
            past = self.size - self._threshold
            if self._memory is not None and self._memory.take(past - self._taken):
                self._taken = past
                return
            self._give_back()
            self._file = tempfile.TemporaryFile()
            self._file.writelines(self._chunks)
            self._chunks = []

    @property
    def small(self) -> bool:
        """In memory within its own threshold: can be answered in one piece, holding no
        shared memory while it is sent."""
        return self._file is None and self.size <= self._threshold

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def getvalue(self) -> bytes:
        """The whole body, for small answers held in memory."""
        assert self._file is None
        return b"".join(self._chunks)

    def read_all(self) -> bytes:
        """The whole body, wherever it is held (the spool can still be streamed after)."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.seek(0)
        return self._file.read()

    def take_all(self) -> bytes:
        """The whole body of a spool held in memory, its pieces dropped: what it holds of
        the shared memory is given back by `close`, once the body is sent."""
        assert self._file is None
        body = b"".join(self._chunks)
        self._chunks = []
        return body

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in chunks; closes the spool at the end (or when the reader stops)."""
        try:
            if self._file is None:
                # The chunks as they came (aiohttp's reads, up to 256 KiB), small ones
                # joined: each is one send to the client.
                batch: list[bytes] = []
                size = 0
                for chunk in self._chunks:
                    batch.append(chunk)
                    size += len(chunk)
                    if size >= CHUNK:
                        yield b"".join(batch)
                        batch, size = [], 0
                if batch:
                    yield b"".join(batch)
                return
            self._file.seek(0)
            while chunk := self._file.read(CHUNK):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._chunks = []
        self._give_back()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _give_back(self) -> None:
        if self._memory is not None and self._taken:
            self._memory.give(self._taken)
        self._taken = 0

    def __del__(self) -> None:
        # A response dropped before it was sent (the client left first) never closes its
        # spool: the shared memory it held is given back all the same.
        self._give_back()
