"""The ledger: one row per request, the source of truth for spend.

Rows are written twice for forwarded requests: `reserve` when the estimate is
taken (the row holds the reservation) and `settle` when the answer is metered.
Rejections and client errors are written once, with `record`. Every backend
keeps the same interface; nothing above it knows which one it talks to.

One design, two dialects: the schema (`migrations`), the columns and their codecs
(`codecs`) and the statements (`statements`, spelled by a `dialect`) are shared;
`sqlite` and `postgres` hold only how each database is written in a transaction, and
`sqlite_connections` and `postgres_pool` how each is connected to. A backend's modules,
and its driver, are imported when a ledger of its kind is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.core.errors import LedgerError, LedgerMissing
from proxy.core.models import Entry, Settlement
from proxy.ledger.base import (
    Backend,
    BatchLine,
    BilledLine,
    HeldEntry,
    Ledger,
    ObjectKind,
    OpenBatch,
    Owner,
    Reservation,
    ResponseRow,
    Row,
    StoredObject,
    UserShare,
    Written,
)
from proxy.ledger.kept import FirstAttempt, KeptAnswer, KeptTail, RepeatGuard
from proxy.ledger.retry import settle_patiently

__all__ = [
    "Backend",
    "BatchLine",
    "BilledLine",
    "Entry",
    "FirstAttempt",
    "HeldEntry",
    "KeptAnswer",
    "KeptTail",
    "Ledger",
    "ObjectKind",
    "OpenBatch",
    "Owner",
    "RepeatGuard",
    "Reservation",
    "ResponseRow",
    "Row",
    "Settlement",
    "StoredObject",
    "UserShare",
    "Written",
    "migrate_ledger",
    "open_ledger",
    "reading_ledger",
    "redacted",
    "require_existing",
    "settle_patiently",
]


SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def redacted(url: str) -> str:
    """`url` without its password, for messages and the start-up banner.

    >>> redacted("postgresql://tollgate:s3cret@db/tollgate?sslmode=require")
    'postgresql://tollgate:***@db/tollgate?sslmode=require'
    >>> redacted("postgresql://db/tollgate?user=tollgate&password=s3cret")
    'postgresql://db/tollgate?user=tollgate&password=***'

    A URL without a password is shown as written: rebuilt, `sqlite:////var/t.db` would
    read `sqlite://var/t.db`, a path relative to the configuration.

    >>> redacted("sqlite:////var/lib/tollgate/tollgate.db")
    'sqlite:////var/lib/tollgate/tollgate.db'
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL one can read a password out of: shown as a scheme only
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"
    if password is None and "password=" not in parts.query:
        return url
    if password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@"))
    if "password=" in parts.query:  # libpq's `?password=`
        query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


async def open_ledger(url: str, *, read_only: bool = False) -> Backend:
    """Open the ledger named by `url`: `sqlite:///path.db` (its schema brought up to date)
    or `postgresql://…` (initialised when empty; a schema behind is refused until
    `tollgate ledger migrate` brings it up to date). `read_only`, for a command that only
    shows it: a SQLite file whose schema is current is opened to read alone, without the
    write lock (`SqliteLedger.open_to_read`); PostgreSQL's opening only reads then anyway."""
    if url.startswith(SQLITE_SCHEME):
        from proxy.ledger.sqlite import SqliteLedger

        ledger = SqliteLedger(url.removeprefix(SQLITE_SCHEME))
        await (ledger.open_to_read() if read_only else ledger.open())
        return ledger
    if url.startswith(POSTGRES_SCHEMES):
        from proxy.ledger.postgres import PostgresLedger

        shared = PostgresLedger(url)
        await shared.open()
        return shared
    raise LedgerError(
        f"unsupported ledger URL {redacted(url)!r}: use sqlite:///path.db or "
        "postgresql://host/database"
    )


@contextlib.asynccontextmanager
async def reading_ledger(url: str) -> AsyncIterator[Backend]:
    """The ledger at `url` opened for a command that only shows it (`open_ledger`'s
    `read_only`: no write lock on a SQLite file whose schema is current, which its user
    may only read), and closed when the command is done with it."""
    ledger = await open_ledger(url, read_only=True)
    try:
        yield ledger
    finally:
        await ledger.close()


def require_existing(url: str) -> str:
    """`url`, for a command that only reads the ledger (called outside any event loop): a
    SQLite file that does not exist, or a SQLite file or PostgreSQL database that holds no
    Tollgate ledger, raises LedgerMissing. Opening it would create an empty ledger (and
    any missing directory; on PostgreSQL, the tables in whatever schema the URL's
    search path names) and report nothing, as if nothing had been spent. `tollgate serve`
    and `tollgate ledger migrate` create a ledger; a PostgreSQL database itself is
    created by its administrator."""
    advice = (
        "check --ledger or the configuration's `ledger` "
        "(`tollgate serve` or `tollgate ledger migrate` creates one)"
    )
    if url.startswith(SQLITE_SCHEME):
        from proxy.ledger.sqlite import schema_version

        path = url.removeprefix(SQLITE_SCHEME)
        if path != ":memory:" and schema_version(path) == 0:
            raise LedgerMissing(f"no ledger at {path}: {advice}")
    elif url.startswith(POSTGRES_SCHEMES):
        from proxy.ledger.postgres import version_of

        if asyncio.run(version_of(url)) == 0:
            raise LedgerMissing(f"no ledger in the PostgreSQL database {redacted(url)}: {advice}")
    return url


async def migrate_ledger(url: str) -> tuple[int, int]:
    """Bring the schema of the ledger at `url` up to date; (version before, version after)."""
    if url.startswith(POSTGRES_SCHEMES):
        from proxy.ledger import postgres

        return await postgres.migrate(url)
    if url.startswith(SQLITE_SCHEME):
        from proxy.ledger import sqlite

        return await sqlite.migrate(url.removeprefix(SQLITE_SCHEME))
    raise LedgerError(f"unsupported ledger URL {redacted(url)!r}")
