"""The PostgreSQL ledger's connections lost under a running Tollgate: without a word between
requests (a fail-over, a NAT), ended by the server (`pg_terminate_backend`, a restart), or
while the process was paused in the middle of a settlement."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from tests import pg
from tests.conftest import Simulator, start_tollgate
from tests.test_budgets_e2e import STORM_KEY, fire, storm_config
from tests.test_replicas_e2e import local_ports

T = TypeVar("T")
IMAGE = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}


def sessions_of(url: str, pid: int) -> list[int]:
    """The server pids of the sessions process `pid` holds open on the server of `url`."""
    ports = local_ports(pid)
    found = pg.fetch(url, "SELECT pid, client_port FROM pg_stat_activity WHERE client_port > 0")
    return [r["pid"] for r in found if r["client_port"] in ports]


class Relay:
    """A TCP relay to the PostgreSQL server of `url` that can lose its connections without
    a word (`forget`), as a NAT, a load balancer or a fail-over of the server's address
    does: the server's sessions end, and the client learns it only when it next sends,
    answered by a reset."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.server = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.forgotten: set[asyncio.StreamWriter] = set()
        self.upstreams: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener = self.call(asyncio.start_server(self.relay, "127.0.0.1", 0))
        port = self.listener.sockets[0].getsockname()[1]
        user = parts.netloc.rpartition("@")[0]
        self.url = urlunsplit(
            parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}")
        )

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection(*self.server)
        self.upstreams[to_client] = to_server

        async def up() -> None:
            while data := await client.read(65536):
                if to_client in self.forgotten:  # a packet of a connection it forgot
                    sock = to_client.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    to_client.transport.abort()  # reset
                    return
                to_server.write(data)
                await to_server.drain()
            to_server.close()

        async def down() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await server.read(65536):
                    to_client.write(data)
                    await to_client.drain()
            if to_client not in self.forgotten:
                to_client.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(up(), down())

    async def _forget(self) -> int:
        for to_client, to_server in self.upstreams.items():
            if to_client not in self.forgotten and not to_client.is_closing():
                self.forgotten.add(to_client)
                to_server.transport.abort()
        return len(self.forgotten)

    def forget(self) -> int:
        """Lose every open connection silently; how many were lost."""
        return self.call(self._forget())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.listener.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def test_connections_lost_silently_between_requests_cost_no_request(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """Each connection of the pool lost without a word (a fail-over, a NAT or load balancer
    that dropped them) used to be found dead by a request in turn, each answered 503: the
    first found lost now has the pool replace the others, and its own transaction (rolled
    back by then) is run again on a fresh connection."""
    storm_config(tmp_path, simulator, Decimal(100))
    relay = Relay(shared)
    proxy = start_tollgate(tmp_path, ledger_url=relay.url)
    try:
        simulator.configure(latency_ms=200)
        assert set(asyncio.run(fire(proxy.url, 20))) == {200}  # the pool opens its connections
        simulator.configure(latency_ms=0)
        assert relay.forget() >= 1
        with httpx.Client(timeout=60) as http:
            answers = [
                http.post(
                    f"{proxy.url}/v1/images/generations",
                    headers={"authorization": f"Bearer {STORM_KEY}"},
                    json=IMAGE,
                )
                for _ in range(12)
            ]
    finally:
        simulator.configure(latency_ms=0)
        log = proxy.stop()
        relay.close()
    assert [a.status_code for a in answers] == [200] * len(answers), log
    rows = pg.fetch(shared, "SELECT state FROM requests")
    assert [r["state"] for r in rows] == ["settled"] * 32


def test_sessions_ended_by_the_server_between_requests_cost_no_request(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """`pg_terminate_backend` (or a restart) ends the sessions with a word to each: the pool
    replaces them before the next request uses one."""
    storm_config(tmp_path, simulator, Decimal(100))
    proxy = start_tollgate(tmp_path, ledger_url=shared)
    try:
        simulator.configure(latency_ms=200)
        assert set(asyncio.run(fire(proxy.url, 20))) == {200}  # the pool opens its connections
        simulator.configure(latency_ms=0)
        ended = sessions_of(shared, proxy.process.pid)
        assert len(ended) > 1, ended
        os.kill(proxy.process.pid, signal.SIGSTOP)  # ended while it could not notice
        try:
            pg.fetch(shared, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", ended)
            deadline = time.monotonic() + 60
            while pg.fetch(shared, WHERE_ALIVE, ended):
                assert time.monotonic() < deadline, "sessions never ended"
                time.sleep(0.05)
        finally:
            os.kill(proxy.process.pid, signal.SIGCONT)
        answers = asyncio.run(fire(proxy.url, 20))
    finally:
        simulator.configure(latency_ms=0)
        log = proxy.stop()
    assert answers == [200] * len(answers), log


WHERE_ALIVE = "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])"


def test_a_replica_paused_past_its_deadline_in_the_middle_of_a_settlement_settles_it(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """Paused (SIGSTOP, a frozen VM) inside its settlement's transaction for longer than the
    settlement's retries (`timeout_s`), the replica resumes with its deadline gone and its
    session ended by the server (`idle_in_transaction_session_timeout`, shortened here).
    The settlement fails on that dead connection once, and is written on a fresh one: the
    request ends settled at its cost, not left reserved for a reclaim at its bound."""
    storm_config(tmp_path, simulator, Decimal(100))  # timeout_s: 3
    url = f"{shared}&idle_in_transaction_session_timeout=3s"
    proxy = start_tollgate(tmp_path, ledger_url=url)
    pid = proxy.process.pid
    waiting = "SELECT pid, client_port FROM pg_stat_activity WHERE wait_event_type = 'Lock'"

    async def until(what: str, found: Callable[[], Awaitable[T | None]]) -> T:
        deadline = time.monotonic() + 60
        while (value := await found()) is None:
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)
        return value

    async def rows(sql: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(pg.fetch, url, sql)

    async def paused_in_a_settlement() -> httpx.Response:
        async with httpx.AsyncClient(timeout=120) as http:
            asking = asyncio.create_task(
                http.post(
                    f"{proxy.url}/v1/images/generations",
                    headers={"authorization": f"Bearer {STORM_KEY}"},
                    json=IMAGE,
                )
            )

            async def reserved() -> bool | None:
                return bool(await rows("SELECT id FROM requests WHERE state = 'reserved'")) or None

            await until("never reserved", reserved)
            # The counters' rows locked: its settlement waits on the first lock, inside its
            # transaction; paused there, then the lock let go, its statement ends and the
            # session sits idle inside the transaction until the server ends it.
            locker = await asyncpg.connect(shared)
            try:
                async with locker.transaction():
                    await locker.execute("SELECT * FROM budget_usage FOR UPDATE")

                    async def settling() -> int | None:
                        ports = await asyncio.to_thread(local_ports, pid)
                        found = [r["pid"] for r in await rows(waiting) if r["client_port"] in ports]
                        return found[0] if found else None

                    session = await until("the settlement never waited", settling)
                    os.kill(pid, signal.SIGSTOP)
                    paused_at = time.monotonic()
            finally:
                await locker.close()
            try:

                async def ended() -> bool | None:
                    alive = await rows(f"SELECT 1 FROM pg_stat_activity WHERE pid = {session}")
                    return None if alive else True

                await until("the server never ended the paused session", ended)
                # Past the settlement's retries (`timeout_s`: 3 seconds) as well.
                await asyncio.sleep(max(0.0, paused_at + 4.0 - time.monotonic()))
            finally:
                os.kill(pid, signal.SIGCONT)
            return await asking

    try:
        simulator.configure(latency_ms=2000)  # under `timeout_s`
        answer = asyncio.run(paused_in_a_settlement())
    finally:
        simulator.configure(latency_ms=0)
        log = proxy.stop()
    assert answer.status_code == 200, answer.text
    # The answer is sent once its settlement is written (or given up).
    [row] = pg.fetch(url, "SELECT state, outcome, cost_nanos, upstream_request_id FROM requests")
    assert row["state"] == "settled" and row["outcome"] == "ok", (row, log)
    assert row["upstream_request_id"] == answer.headers["x-request-id"]
    counters = "SELECT DISTINCT reserved_nanos AS r, spent_nanos AS s FROM budget_usage"
    assert pg.fetch(url, counters) == [{"r": 0, "s": row["cost_nanos"]}]
