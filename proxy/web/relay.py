"""Stream chunks from the upstream's reader to the client's writer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class Relay:
    """Hands stream chunks from the upstream reader to the client writer.

    When the client goes away the reader keeps reading (and metering); chunks
    are then dropped instead of queued.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._listening = True

    def put(self, chunk: bytes) -> None:
        if self._listening:
            self._queue.put_nowait(chunk)

    @property
    def listening(self) -> bool:
        """The client still reads the events (False once it is gone)."""
        return self._listening

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[bytes]:
        """The chunks in order; those that queued up while the client's last write was under
        way go out together, in one write (a busy process sends a 2 MB event in a few
        writes, not one per upstream read)."""
        queue = self._queue
        try:
            while (chunk := await queue.get()) is not None:
                if queue.empty():
                    yield chunk
                    continue
                waiting = [chunk]
                ended = False
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    waiting.append(more)
                yield b"".join(waiting)
                if ended:
                    return
        finally:
            self._listening = False
