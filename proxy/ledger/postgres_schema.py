"""The PostgreSQL ledger's schema: its version, the initialisation of an empty database
by the first replica to open it, and migrations (`tollgate ledger migrate`), each in one
transaction under an advisory lock (see `migrations`)."""

from __future__ import annotations

from typing import Any

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.ledger import migrations
from proxy.ledger.postgres_pool import Pool

SCHEMA_VERSION = migrations.SCHEMA_VERSION
MIGRATION_LOCK = 0x7011_6A7E
"""The advisory lock that keeps two migrations (`tollgate ledger migrate`, or replicas
initialising an empty database together) from interleaving."""


class Schema:
    """The schema part of `PostgresLedger`."""

    db: Pool
    name: str

    async def version(self) -> int:
        """The schema version the database is at (0: no Tollgate tables yet)."""
        async with self.db.connection() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            if not exists:
                return 0
            found = await conn.fetchval("SELECT max(version) FROM schema_version")
        return int(found or 0)

    async def _initialise(self) -> int:
        """Bring an empty database to this Tollgate's version; the version found otherwise.

        Emptiness is decided under the migration lock, in the transaction that creates
        the tables: of two replicas starting together on an empty database, the second
        waits for the first's commit, then finds its tables and leaves them alone. A
        database with some Tollgate tables but no version is not empty: it is refused
        like any schema behind, for `tollgate ledger migrate` to finish."""
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if await conn.fetchval(_ANY_TABLE, list(migrations.TABLES)):
                if not await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
                    return 0
                return int(await conn.fetchval(_VERSION))
            await _apply(conn, 0)
        return SCHEMA_VERSION

    async def migrate(self) -> tuple[int, int]:
        """Apply the pending migrations in one transaction; (version before, version after)."""
        try:
            return await self._migrate()
        except LedgerUnavailable as exc:
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger {self.name}: {exc.__cause__ or exc}"
            ) from exc

    async def _migrate(self) -> tuple[int, int]:
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            found = int(await conn.fetchval(_VERSION))
            if found > SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.name}: ledger schema version {found} is newer than this Tollgate's "
                    f"({SCHEMA_VERSION}); upgrade Tollgate"
                )
            await _apply(conn, found)
        return found, SCHEMA_VERSION


_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"
_ANY_TABLE = "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL)"
"""Whether any of the tables named exists on the connection's search path."""


async def _apply(conn: Any, found: int) -> None:
    """Take the schema from version `found` to this Tollgate's, in the caller's transaction."""
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
    for sql in migrations.pending(found, migrations.POSTGRES):
        await conn.execute(sql)
    await conn.execute("DELETE FROM schema_version")
    await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
