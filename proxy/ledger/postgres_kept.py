"""The answers kept for repeats (README, "Retries never pay twice") in the PostgreSQL
ledger: a repeat's first attempt, the answers and live streams kept for it within
`retries.store_bytes`, shared by every replica, and their forgetting.

Writers of kept answers take turns on one table lock (`KEEP_LOCK_SQL`): each sums what the
one before it left, so the bound holds however many replicas keep answers together;
readers never wait.
"""

from __future__ import annotations

from typing import Any

from proxy.ledger import codecs
from proxy.ledger.dialect import POSTGRES
from proxy.ledger.kept import FirstAttempt, KeptAnswer, KeptTail
from proxy.ledger.postgres_pool import Pool
from proxy.ledger.statements import statements

SQL = statements(POSTGRES)
KEEP_LOCK_SQL = "LOCK TABLE kept_answers IN SHARE ROW EXCLUSIVE MODE"
"""Taken by each `keep_answer` first: it conflicts with itself and with other writes of
kept answers, not with reads."""


class KeptAnswers:
    """The kept-answer part of `PostgresLedger` (see `proxy.ledger.base.Ledger`)."""

    db: Pool

    async def first_attempt(
        self, team: str, since: float, *, content: str | None = None, key: str | None = None
    ) -> FirstAttempt | None:
        if key is not None:
            found = await self.db.fetch(SQL.first_by_key, team, key, float(since))
        elif content is not None:
            found = await self.db.fetch(SQL.first_by_content, team, content, float(since))
        else:
            return None
        return codecs.first_attempt(tuple(found[0])) if found else None

    async def keep_answer(self, answer: KeptAnswer, store_bytes: int) -> bool:
        size = len(answer.body)
        if size > store_bytes:
            return False
        values = codecs.answer_values(answer)

        async def work(conn: Any) -> None:
            # Replicas keeping answers together take turns: each sums what the one before
            # it left, so the bound holds whatever their number (readers never wait).
            await conn.execute(KEEP_LOCK_SQL)
            await _forget(conn, answer.request_id)
            await conn.execute(SQL.make_room_chunks, store_bytes - size)
            await conn.execute(SQL.make_room, store_bytes - size)
            await conn.execute(SQL.keep_answer, *values)

        await self.db.transaction(work)
        return True

    async def append_chunk(
        self, request_id: str, seq: int, chunk: bytes, now: float, store_bytes: int
    ) -> bool:
        size = len(chunk)

        async def work(conn: Any) -> bool:
            await conn.execute(KEEP_LOCK_SQL)  # as keep_answer: the bound is summed in turn
            grown = await conn.execute(
                SQL.grow_stream, size, float(now), request_id, size, store_bytes
            )
            if grown == "UPDATE 0":
                await _forget(conn, request_id)  # gone already, or too large to keep
                return False
            await conn.execute(SQL.make_room_chunks, store_bytes)
            await conn.execute(SQL.make_room, store_bytes)
            if not await conn.fetch(SQL.still_kept, request_id):
                return False  # newer answers took the room
            await conn.execute(SQL.keep_chunk, request_id, seq, chunk)
            return True

        kept: bool = await self.db.transaction(work)
        return kept

    async def end_stream(self, request_id: str) -> bool:
        return await self.db.execute(SQL.end_stream, request_id) == "UPDATE 1"

    async def forget_answer(self, request_id: str) -> None:
        async def work(conn: Any) -> None:
            await conn.execute(KEEP_LOCK_SQL)
            await _forget(conn, request_id)

        await self.db.transaction(work)

    async def kept_answer(self, request_id: str) -> KeptAnswer | None:
        found = await self.db.fetch(SQL.kept_answer, request_id)
        if not found:
            return None
        chunks = await self.db.fetch(SQL.kept_chunks, request_id, -1)
        return codecs.kept_answer(tuple(found[0]), [tuple(c) for c in chunks])

    async def kept_tail(self, request_id: str, after: int) -> KeptTail | None:
        # From the start, its body too (a whole answer's, or what a stream kept whole).
        whole = after < 0
        found = await self.db.fetch(SQL.kept_answer if whole else SQL.kept_head, request_id)
        if not found:
            return None
        chunks = [tuple(c) for c in await self.db.fetch(SQL.kept_chunks, request_id, after)]
        read = codecs.kept_answer if whole else codecs.kept_head
        return KeptTail(read(tuple(found[0]), chunks), chunks[-1][0] if chunks else after)

    async def forget_answers(self, kept_before: float) -> int:
        async def work(conn: Any) -> int:
            await conn.execute(KEEP_LOCK_SQL)
            await conn.execute(SQL.forget_chunks_before, float(kept_before))
            status: str = await conn.execute(SQL.forget_answers, float(kept_before))
            return int(status.rsplit(" ", 1)[1])

        forgotten: int = await self.db.transaction(work)
        return forgotten


async def _forget(conn: Any, request_id: str) -> None:
    """Forget the answer kept for `request_id`, and its chunks."""
    await conn.execute(SQL.forget_chunks, request_id)
    await conn.execute(SQL.forget_answer, request_id)
