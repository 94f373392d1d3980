"""A bounded-memory buffer for upstream answers that must be read before they are sent.

The cost header needs `usage`, which comes at the end of a multi-megabyte answer,
so a non-streamed answer is held until it is metered. Past `threshold` bytes it
moves to an anonymous temporary file, so thousands of answers in flight (or
slow readers) cost disk, not memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import IO

CHUNK = 256 * 1024


class Spool:
    # Small enough that 2,000 answers being read at once hold ~128 MiB at most.
    def __init__(self, threshold: int = 64 * 1024) -> None:
        self._threshold = threshold
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
            self._file = tempfile.TemporaryFile()
            self._file.writelines(self._chunks)
            self._chunks = []

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

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in chunks; closes the spool at the end (or when the reader stops)."""
        try:
            if self._file is None:
                for chunk in self._chunks:
                    yield chunk
                return
            self._file.seek(0)
            while chunk := self._file.read(CHUNK):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
