"""PostgreSQL for tests: a fresh schema per test on the shared server, or a private server.

The shared server is this machine's (127.0.0.1:5432, trust auth, database `test`;
`tests/run` installs and starts it). Each test gets its own schema, named in its
ledger URL (`?search_path=…`), so tests never see each other's rows. A test that
stops the database runs its own throw-away cluster (`initdb` + `pg_ctl` on a free
port), so the shared server is never stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

if TYPE_CHECKING:
    from proxy.ledger.base import Backend

T = TypeVar("T")

SERVER = os.environ.get("TOLLGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on a loop of its own (callable from sync and async tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r.items()) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    return run(_fetch(url.split("?")[0] + _options(url), sql, *args))


def _options(url: str) -> str:
    return "?" + url.split("?", 1)[1] if "?" in url else ""


def available() -> bool:
    try:
        run(_execute(SERVER, "SELECT 1"))
    except (OSError, asyncpg.PostgresError):
        return False
    return True


def new_schema(server: str = SERVER) -> str:
    """A fresh, empty schema on `server`; the ledger URL that uses it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    run(_execute(server, f"CREATE SCHEMA {name}"))
    return f"{server}?search_path={name}"


def drop_schema(url: str) -> None:
    name = url.rsplit("search_path=", 1)[1]
    run(_execute(url.split("?")[0], f"DROP SCHEMA IF EXISTS {name} CASCADE"))


def migrated_schema(server: str = SERVER) -> str:
    """A fresh schema already brought to this Tollgate's version."""
    from proxy.ledger import migrate_ledger

    url = new_schema(server)
    run(migrate_ledger(url))
    return url


def schema_at_version(version: int, server: str = SERVER) -> str:
    """A fresh schema left at an older `version` of the ledger (a schema behind)."""
    from proxy.ledger import migrations

    url = new_schema(server)
    statements = [
        "CREATE TABLE schema_version (version INTEGER)",
        *migrations.pending(0, migrations.POSTGRES[:version]),
        f"INSERT INTO schema_version VALUES ({version})",
    ]
    run(_execute(url.split("?")[0] + _options(url), ";\n".join(statements)))
    return url


def ledger_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty ledger of `backend`: a new SQLite file, or a new PostgreSQL schema."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger' / 'tollgate.db'}"
    return migrated_schema()


def ledger_at_version(kind: str, directory: Path, version: int, *inserts: str) -> str:
    """The URL of a ledger left at an older schema `version` holding the rows `inserts`: a
    SQLite file in `directory` (kind `sqlite`) or a fresh PostgreSQL schema."""
    from proxy.ledger import migrations

    if kind == "sqlite":
        import sqlite3

        path = directory / f"v{version}.db"
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for sql in migrations.pending(0, migrations.SQLITE[:version]):
                db.execute(sql)
            db.execute(f"INSERT INTO schema_version VALUES ({version})")
            for sql in inserts:
                db.execute(sql)
        return f"sqlite:///{path}"
    url = schema_at_version(version)
    for sql in inserts:
        fetch(url, sql)
    return url


@contextlib.asynccontextmanager
async def migrated_from(
    kind: str, directory: Path, version: int, *inserts: str
) -> AsyncIterator[Backend]:
    """A ledger left at schema `version` holding `inserts` (`ledger_at_version`), migrated
    to the current version and opened; once it is closed, migrating it again finds nothing
    to do, and a PostgreSQL schema is dropped."""
    from proxy.ledger import migrate_ledger, migrations, open_ledger

    url = ledger_at_version(kind, directory, version, *inserts)
    try:
        assert await migrate_ledger(url) == (version, migrations.SCHEMA_VERSION)
        ledger = await open_ledger(url)
        try:
            yield ledger
        finally:
            await ledger.close()
        assert await migrate_ledger(url) == (migrations.SCHEMA_VERSION,) * 2
    finally:
        if kind == "postgresql":
            drop_schema(url)


class Cluster:
    """A private PostgreSQL server in a temporary directory, which a test may stop and start."""

    def __init__(self, port: int) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = Path(found[-1]).parent
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:  # initdb refuses root
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.dir / "log"),
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
