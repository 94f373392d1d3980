"""The answers kept for repeats (README, "Retries never pay twice") in the SQLite ledger:
a repeat's first attempt, the answers and live streams kept for it within
`retries.store_bytes`, shared by every worker on the machine, and their forgetting. Each
write runs under the file's one write lock, so the bound is summed by one writer at a
time."""

from __future__ import annotations

import sqlite3

from proxy.ledger import codecs
from proxy.ledger.dialect import SQLITE
from proxy.ledger.kept import FirstAttempt, KeptAnswer, KeptTail
from proxy.ledger.sqlite_connections import Connections
from proxy.ledger.statements import statements

SQL = statements(SQLITE)
LONG_ANSWER = 64 * 1024
"""Bytes of a kept answer past which it is written on the thread rather than inline."""


class KeptAnswers:
    """The kept-answer part of `SqliteLedger` (see `proxy.ledger.base.Ledger`)."""

    file: Connections

    async def first_attempt(
        self, team: str, since: float, *, content: str | None = None, key: str | None = None
    ) -> FirstAttempt | None:
        if key is not None:
            found = await self.file.fetch(SQL.first_by_key, (team, key, since))
        elif content is not None:
            found = await self.file.fetch(SQL.first_by_content, (team, content, since))
        else:
            return None
        return codecs.first_attempt(found[0]) if found else None

    async def keep_answer(self, answer: KeptAnswer, store_bytes: int) -> bool:
        size = len(answer.body)
        if size > store_bytes:
            return False
        values = codecs.answer_values(answer)

        def run(conn: sqlite3.Connection) -> None:
            _forget(conn, answer.request_id)
            conn.execute(SQL.make_room_chunks, (store_bytes - size,))
            conn.execute(SQL.make_room, (store_bytes - size,))
            conn.execute(SQL.keep_answer, values)

        # A large body is copied into the file off the loop, which goes on serving meanwhile.
        await self.file.transaction(run, long=size > LONG_ANSWER)
        return True

    async def append_chunk(
        self, request_id: str, seq: int, chunk: bytes, now: float, store_bytes: int
    ) -> bool:
        size = len(chunk)

        def run(conn: sqlite3.Connection) -> bool:
            grown = (size, now, request_id, size, store_bytes)
            if conn.execute(SQL.grow_stream, grown).rowcount == 0:
                _forget(conn, request_id)  # gone already, or too large to keep
                return False
            conn.execute(SQL.make_room_chunks, (store_bytes,))
            conn.execute(SQL.make_room, (store_bytes,))
            if not conn.execute(SQL.still_kept, (request_id,)).fetchall():
                return False  # a replica's newer answers took the room
            conn.execute(SQL.keep_chunk, (request_id, seq, chunk))
            return True

        kept: bool = await self.file.transaction(run, long=size > LONG_ANSWER)
        return kept

    async def end_stream(self, request_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL.end_stream, (request_id,)).rowcount == 1

        ended: bool = await self.file.transaction(run)
        return ended

    async def forget_answer(self, request_id: str) -> None:
        await self.file.transaction(lambda conn: _forget(conn, request_id))

    async def kept_answer(self, request_id: str) -> KeptAnswer | None:
        found = await self.file.fetch(SQL.kept_answer, (request_id,))
        if not found:
            return None
        chunks = await self.file.fetch(SQL.kept_chunks, (request_id, -1))
        return codecs.kept_answer(found[0], chunks)

    async def kept_tail(self, request_id: str, after: int) -> KeptTail | None:
        # From the start, its body too (a whole answer's, or what a stream kept whole).
        whole = after < 0
        found = await self.file.fetch(SQL.kept_answer if whole else SQL.kept_head, (request_id,))
        if not found:
            return None
        chunks = await self.file.fetch(SQL.kept_chunks, (request_id, after))
        read = codecs.kept_answer if whole else codecs.kept_head
        return KeptTail(read(found[0], chunks), chunks[-1][0] if chunks else after)

    async def forget_answers(self, kept_before: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute(SQL.forget_chunks_before, (kept_before,))
            return conn.execute(SQL.forget_answers, (kept_before,)).rowcount

        return await self.file.transaction(run)


def _forget(conn: sqlite3.Connection, request_id: str) -> None:
    """Forget the answer kept for `request_id`, and its chunks."""
    conn.execute(SQL.forget_chunks, (request_id,))
    conn.execute(SQL.forget_answer, (request_id,))
