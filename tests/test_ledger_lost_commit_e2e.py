"""A reservation's commit that PostgreSQL made but whose answer never came back (the
connection dropped after the COMMIT was sent): the request is answered 503 and never
forwarded, and its row, which may have been written, is settled at no cost rather than
left reserved, to be charged its bound as if it had gone upstream. The SDK's retry of the
503 is then forwarded as a new request, not held behind a first attempt that never ran."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.ledger import migrate_ledger
from tests import pg
from tests.conftest import Simulator, start_tollgate, write_config

SSL_REQUEST = 80877103


class CommitDropper:
    """A TCP relay in front of PostgreSQL that, once `armed`, lets the first COMMIT that
    follows a reservation's insert reach the server, waits for its answer, and drops the
    connection instead of passing the answer on."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.port = 0

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.server_port
        )
        answers = asyncio.create_task(self.pass_on(upstream_reader, writer))
        try:
            await self.messages(reader, upstream_reader, upstream_writer, writer, answers)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            answers.cancel()
            for each in (writer, upstream_writer):
                each.close()

    async def pass_on(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()

    async def messages(
        self,
        reader: asyncio.StreamReader,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        answers: asyncio.Task[None],
    ) -> None:
        # The untyped start: an SSL request (answered 'N'), then the startup message.
        while True:
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            upstream.write(struct.pack("!i", length) + body)
            await upstream.drain()
            if struct.unpack("!i", body[:4])[0] != SSL_REQUEST:
                break
        reserving = False
        while True:
            kind = await reader.readexactly(1)
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if kind == b"P" and b"INSERT INTO requests" in body:
                reserving = True
            if (
                kind == b"Q"
                and body.upper().startswith(b"COMMIT")
                and reserving
                and self.armed.is_set()
                and not self.dropped.is_set()
            ):
                self.dropped.set()
                answers.cancel()  # the server's answer to the COMMIT is never passed on
                with contextlib.suppress(asyncio.CancelledError):
                    await answers
                upstream.write(kind + struct.pack("!i", length) + body)
                await upstream.drain()
                await upstream_reader.read(65536)  # committed: its answer came
                return
            if kind == b"Q":
                reserving = False
            upstream.write(kind + struct.pack("!i", length) + body)
            await upstream.drain()


@contextmanager
def dropping_commits(server_port: int) -> Iterator[CommitDropper]:
    dropper = CommitDropper(server_port)
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(dropper.relay, "127.0.0.1", 0))
    dropper.port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield dropper
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture
def ledger_url() -> Iterator[str]:
    url = pg.migrated_schema()
    yield url
    pg.drop_schema(url)


def test_a_reservation_whose_commit_answer_is_lost_is_not_charged_and_its_retry_goes_through(
    simulator: Simulator, tmp_path: Path, ledger_url: str
) -> None:
    port = int(ledger_url.split("@", 1)[1].split("/", 1)[0].split(":")[1])
    write_config(tmp_path, f"{simulator.url}/v1")
    with dropping_commits(port) as dropper:
        relayed = ledger_url.replace(f":{port}/", f":{dropper.port}/")
        pg.run(migrate_ledger(relayed))
        gate = start_tollgate(tmp_path, ledger_url=relayed)
        try:
            billed = len(simulator.billing())
            dropper.armed.set()
            client = gate.client(max_retries=1)  # as the SDK does by default: a 503 retried
            answer = client.images.with_raw_response.generate(
                model="gpt-image-2", prompt="a lost commit", quality="low", size="1024x1024"
            )
            assert dropper.dropped.is_set()
            assert answer.http_response.status_code == 200
            assert answer.retries_taken == 1
        finally:
            log = gate.stop()
    rows = pg.fetch(ledger_url, "SELECT * FROM requests ORDER BY started_at")
    first, retried = rows
    assert first["state"] == "settled", log
    assert (first["cost_nanos"], first["status"], first["flagged"]) == (0, 503, False)
    assert retried["outcome"] == "ok" and retried["cost_nanos"] > 0
    assert len(simulator.billing()) == billed + 1
    [usage] = pg.fetch(
        ledger_url,
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'organization' AND period = 'total'",
    )
    assert (usage["spent_nanos"], usage["reserved_nanos"]) == (retried["cost_nanos"], 0)
