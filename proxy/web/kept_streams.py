"""Streams kept as they go, for the repeats that arrive while the first still streams.

The first attempt's exchange hands each event it relays to its `Recorder` too. Once the
answer is sure to be kept (the request carried an `Idempotency-Key`, or its client is
gone), the recorder appends what it holds to the ledger, then each later event as it
arrives (`Ledger.append_chunk`; the events that came while a write was under way go
together in the next), and marks the stream ended (`Ledger.end_stream`) before the
attempt is settled. The ledger is the one place every worker and replica shares, so a
repeat served anywhere `follow`s the stream there: the events so far at once, then each
later one within `TAIL_S`, then the end.

A stream that breaks off after it was sent is charged (OpenAI may have billed it): it is
kept as its client got it, the error event that ends it included, and its repeats get
that. One that outgrows `retries.store_bytes` is forgotten: a repeat that follows it
ends its own stream with an error event in OpenAI's shape (`interrupted`), and so does
one whose first attempt's process dies, or that outlives the deadline. Its client got
some of the first's events already; a new request's events could not follow them, so
nothing is forwarded anew once one event was passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from proxy.core.errors import LedgerError
from proxy.ledger import KeptAnswer, KeptTail
from proxy.web.runtime import Runtime
from proxy.web.spool import Spool

log = logging.getLogger("tollgate.requests")

TAIL_S = 0.05
"""How often a repeat following a live stream asks the ledger for its next events."""
INTERRUPTED = (
    "The first attempt of this request stopped streaming before its end (its process "
    "stopped, it outlived its deadline, or it outgrew what Tollgate keeps for retries); the "
    "events before this one are all it sent. Send the request again, without a retry header "
    "or with a new Idempotency-Key, for a new image (it is charged)."
)


def interrupted() -> bytes:
    """The event that ends a followed stream cut short, in OpenAI's error shape."""
    error = {"message": INTERRUPTED, "type": "server_error", "code": "stream_interrupted"}
    data = json.dumps({"type": "error", "error": {**error, "param": None}})
    return f"event: error\ndata: {data}\n\n".encode()


class Recorder:
    """Keeps the stream of one attempt in the ledger as it goes, for its repeats."""

    def __init__(self, runtime: Runtime, head: KeptAnswer, store_bytes: int) -> None:
        self.runtime = runtime
        self.head = head
        """The kept answer's status, headers and team; its body is its chunks."""
        self.store_bytes = store_bytes
        self.before = Spool(memory=runtime.spools)
        """The events relayed before the answer was sure to be kept (every repeatable
        stream's, while its client reads it): held as an answer being read is, within the
        process's spool memory and else on disk, not each whole stream in memory."""
        self.pending: list[bytes] = []
        """The events relayed since, until the writer takes them."""
        self.size = 0
        self.dropped = False
        """Not kept: too large, or the ledger refused it (its repeats are forwarded anew,
        or end their stream with an error)."""
        self.closing = False
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None

    def put(self, chunk: bytes, wanted: bool) -> None:
        """One more event relayed; `wanted`: the answer is sure to be kept by now."""
        if self.dropped:
            return
        self.size += len(chunk)
        if self.size > self.store_bytes:
            self.drop()
            return
        if self.writer is None:
            try:
                self.before.write(chunk)
            except OSError as exc:
                # No room in memory and no file to spill to (too many open files, a full
                # disk): not kept, and the stream goes on to its client and its settlement.
                log.error("holding the stream of %s failed: %s", self.head.request_id, exc)
                self.drop()
                return
            if wanted:
                self.writer = self.runtime.spawn(self.write())
        else:
            self.pending.append(chunk)
        self.wake.set()

    async def end(self, wanted: bool) -> None:
        """The stream ended whole: what is left is written and the stream marked ended, or
        (`wanted` False: its client read it to the end) nothing is kept."""
        if self.dropped or (not wanted and self.writer is None):
            self.before.close()
            return
        if self.writer is None:
            self.writer = self.runtime.spawn(self.write())
        self.closing = True
        self.wake.set()
        await self.writer
        if self.dropped:
            return
        try:
            if not await self.runtime.ledger.end_stream(self.head.request_id):
                log.info("the stream kept for %s was forgotten first", self.head.request_id)
        except LedgerError as exc:
            log.error("keeping the stream of %s failed: %s", self.head.request_id, exc)

    async def abandon(self) -> None:
        """The stream failed without a charge: what was kept is forgotten (its followers end
        theirs, and its repeats are sent as new requests)."""
        self.drop()
        if self.writer is not None:
            await self.writer

    def drop(self) -> None:
        self.dropped = True
        self.before.close()
        self.pending.clear()
        self.wake.set()

    def held(self) -> bytes:
        """The events held before the writer started, taken once (their spool closed)."""
        if not self.before.size:
            return b""
        body = self.before.read_all()
        self.before.close()
        self.before = Spool()
        return body

    async def write(self) -> None:
        ledger, request_id = self.runtime.ledger, self.head.request_id
        seq = 0
        try:
            head = KeptAnswer(
                request_id, self.head.team, self.head.status, self.head.headers, b"", True,
                self.runtime.clock(), live=True,
            )  # fmt: skip
            await ledger.keep_answer(head, self.store_bytes)
            while not self.dropped:
                if self.before.size or self.pending:
                    # What came before the writer started (once), then what came since.
                    chunk = b"".join((self.held(), *self.pending))
                    self.pending.clear()
                    now = self.runtime.clock()
                    if not await ledger.append_chunk(request_id, seq, chunk, now, self.store_bytes):
                        self.dropped = True  # forgotten to make room for newer answers
                        return
                    seq += 1
                    continue
                if self.closing:
                    return
                self.wake.clear()
                await self.wake.wait()
            await ledger.forget_answer(request_id)
        except (LedgerError, OSError) as exc:  # the ledger, or the held events unreadable
            self.drop()  # what it holds of the spool memory given back now, not at the end
            log.error("keeping the stream of %s failed: %s", request_id, exc)
            # When the ledger is down its followers cannot read the stream either.
            with contextlib.suppress(LedgerError):
                await ledger.forget_answer(request_id)


async def follow(
    runtime: Runtime,
    first: KeptTail,
    deadline: float,
    gone: Callable[[], Awaitable[bool]],
    check_every_s: float,
) -> AsyncIterator[bytes]:
    """The events of the live stream `first` (as read so far), then each later one as the
    first attempt keeps it, until it ends; an `interrupted` event when it is forgotten,
    when `gone` says its process died, or at `deadline`."""
    request_id, seq = first.answer.request_id, first.seq
    yield first.answer.body
    clock = runtime.clock
    checked = clock()
    while True:
        await asyncio.sleep(TAIL_S)
        try:
            tail = await runtime.ledger.kept_tail(request_id, seq)
        except LedgerError as exc:
            log.error("following the stream of %s failed: %s", request_id, exc)
            tail = None
        if tail is None:
            yield interrupted()
            return
        if tail.answer.body:
            yield tail.answer.body
            seq = tail.seq
        if not tail.answer.live:
            return
        now = clock()
        if now >= deadline:
            yield interrupted()
            return
        if now - checked >= check_every_s:
            checked = now
            if await gone():
                yield interrupted()
                return
