"""One output line of an ended batch as its row is charged (`proxy.web.batch_follow`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from proxy.config import load_config
from proxy.config.prices import load_price_book
from proxy.core.errors import RequestError
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.pricing import PriceBook
from proxy.core.settlement import MALFORMED_ANSWER
from proxy.core.short_strings import ShortStrings
from proxy.doors.batches import CUSTOM_ID_BYTES
from proxy.ledger import BatchLine, BilledLine, codecs, open_ledger
from proxy.ledger.base import Owner
from proxy.metrics import Metrics
from proxy.web import batch_charges, batch_follow
from proxy.web.batch_follow import (
    BATCH_GONE,
    GONE_AFTER_S,
    GONE_POLLS,
    OUTPUT_GONE,
    BatchFollow,
    OutputLines,
    OutputUnreadable,
    within,
)
from proxy.web.follow import REFUSED_LOG_EVERY_S
from proxy.web.pipeline import new_request_id, new_request_ids
from proxy.web.runtime import Runtime
from tests.conftest import write_config
from tests.test_batches_reload_e2e import price_book
from tests.test_ledger_batches import (
    CREATED,
    CREATION_COUNTERS,
    LINE_BOUND,
    TEAM_COUNTERS,
    batch_entry,
    input_file,
    priced,
    reserve_shared,
    take_batch,
    user_counter,
)

LINE = BatchLine("a", 1, "generations", "gpt-image-2", "low", "1024x1024", 1, None, 5_900_000)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    root: Path = tmp_path_factory.mktemp("batch-follow")
    write_config(root, "http://upstream.invalid/v1", "timezone: UTC\n")
    return cast(Runtime, SimpleNamespace(config=load_config(root)))


def charged(runtime: Runtime, output: dict[str, Any]) -> Any:
    reservation = Entry("tg_req_1", 1_800_000_000.0, "batches", "design")
    raw = json.dumps({"custom_id": "a", **output}).encode()
    rows = batch_charges.Rows(runtime.config, reservation, 1_800_000_000.0, "batch_1")
    found = rows.billed({"a": LINE}, raw)
    assert found is not None
    return found.settlement


@pytest.mark.parametrize("body", ["not an object", ["a", "list"], None, 7])
def test_a_billed_line_whose_body_is_not_an_object_is_charged_its_bound_flagged(
    runtime: Runtime, body: Any
) -> None:
    settled = charged(runtime, {"response": {"status_code": 200, "body": body}})
    assert (settled.cost_nanos, settled.flagged) == (LINE.bound_nanos, True)


# -- a batch the upstream answers 404 ---------------------------------------------------


class Scripted:
    """An upstream whose batch polls are answered, one after the other, as `answers` says:
    a status (with a body of its shape), or an exception to raise."""

    def __init__(self, answers: list[int | Exception]) -> None:
        self.answers = answers
        self.polls = 0

    async def send(self, path: str, *_: Any, **__: Any) -> Any:
        found = self.answers[min(self.polls, len(self.answers) - 1)]
        self.polls += 1
        if isinstance(found, Exception):
            raise found
        if found == 200:
            body = {"id": "batch_abc", "object": "batch", "status": "in_progress"}
        else:
            body = {"error": {"message": "No batch found with id 'batch_abc'.", "code": None}}
        return Answer(found, json.dumps(body).encode())


@dataclass
class Answer:
    status: int
    body: bytes

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    async def aclose(self) -> None:
        pass


Polled = tuple[list[dict[str, Any]], Totals, list[Any]]


def follow_until(
    runtime: Runtime,
    tmp_path: Path,
    answers: list[int | Exception],
    polls: int,
    every_s: float,
    input_file_id: str | None = "file-abc",
    metrics: Any = None,
    upstream: Any = None,
    recorded: dict[str, Any] | None = None,
    alerts: Any = None,
) -> Polled:
    """A batch of three lines reserved and held, then polled `polls` times `every_s` apart
    against an upstream answering `answers` (or `upstream`): its rows, the team's day totals
    and what is still held (`input_file_id` None: a batch adopted whose input file is not
    on record). `recorded` is filled with the ledger's record of each object it names;
    `alerts` is told of the settlements (`settled(entry)`)."""
    now = [CREATED]

    async def run() -> Polled:
        ledger = await open_ledger(f"sqlite:///{tmp_path / 'tollgate.db'}")
        try:
            await ledger.register(Owner("me", "host", 1))
            await ledger.own(input_file(), [priced(i) for i in range(1, 4)])
            await ledger.reserve(CREATION_COUNTERS, take_batch("b1"))
            await ledger.hold("b1", "batch_abc")
            counted = metrics or SimpleNamespace(
                finished=lambda *_, **__: None, started=lambda: None
            )
            here = SimpleNamespace(
                config=runtime.config, ledger=ledger, upstream=upstream or Scripted(answers),
                clock=lambda: now[0], metrics=counted,
                alerts=alerts or SimpleNamespace(settled=lambda entry: None),
            )  # fmt: skip
            followed = BatchFollow(batch_entry("b1", 3), "batch_abc", input_file_id, None)
            for _ in range(polls):
                if await followed.poll(cast(Runtime, here)):
                    break
                now[0] += every_s
            rows = [row async for row in ledger.export(0.0, float("inf"))]
            if recorded is not None:
                for object_id in recorded:
                    recorded[object_id] = await ledger.stored(object_id)
            day = Counter("team", "design", "", "day", 0.0)
            return rows, (await ledger.totals([day]))[day], await ledger.held()
        finally:
            await ledger.close()

    return asyncio.run(run())


def test_a_batch_the_upstream_keeps_answering_404_is_charged_its_lines_bounds_flagged(
    runtime: Runtime, tmp_path: Path
) -> None:
    # The company key moved to another organization: the batch is never found again. Its
    # reservation must not be held for good.
    rows, totals, held = follow_until(runtime, tmp_path, [404], GONE_POLLS * 200, 1.0)
    assert held == []
    assert len(rows) == 3
    for row in rows:
        assert (row["state"], row["cost_nanos"], row["flagged"]) == ("settled", LINE_BOUND, 1)
        assert (row["error_code"], row["response_id"]) == (BATCH_GONE, "batch_abc")
        assert row["started_at"] >= CREATED + GONE_AFTER_S
    assert sorted(r["custom_id"] for r in rows) == ["req-1", "req-2", "req-3"]
    assert (totals.spent_nanos, totals.reserved_nanos) == (3 * LINE_BOUND, 0)


FOUND_BETWEEN: list[int | Exception] = [404] * (GONE_POLLS - 1) + [200] + [404] * (GONE_POLLS - 1)


@pytest.mark.parametrize(
    ("answers", "polls", "every_s"),
    [
        ([404], GONE_POLLS - 1, GONE_AFTER_S),  # long enough, but too few polls
        ([404], GONE_POLLS * 10, GONE_AFTER_S / (GONE_POLLS * 20)),  # many, in too short a time
        ([500], 1000, 60.0),  # the upstream failing for 16 hours: asked again
        ([RequestError("no answer")], 1000, 60.0),
        (FOUND_BETWEEN, len(FOUND_BETWEEN), GONE_AFTER_S),
    ],
    ids=["few-polls", "short-run", "5xx", "no-answer", "found-again"],
)
def test_a_batch_merely_unanswered_or_found_again_stays_held(
    runtime: Runtime, tmp_path: Path, answers: list[int | Exception], polls: int, every_s: float
) -> None:
    rows, totals, held = follow_until(runtime, tmp_path, answers, polls, every_s)
    assert held == [("b1", "batch_abc")]
    [row] = rows
    assert (row["state"], row["cost_nanos"]) == ("reserved", 0)
    assert (totals.spent_nanos, totals.reserved_nanos) == (0, 3 * LINE_BOUND)


def test_404s_between_failed_polls_still_count_as_one_run(runtime: Runtime, tmp_path: Path) -> None:
    # A 5xx or a poll without an answer says nothing of the batch: it neither counts nor
    # breaks the run of 404s.
    answers: list[int | Exception] = [404, 502, RequestError("reset")] * (GONE_POLLS + 1)
    rows, totals, held = follow_until(runtime, tmp_path, answers, GONE_POLLS * 3 + 3, 120.0)
    assert held == []
    assert {(r["error_code"], r["flagged"]) for r in rows} == {(BATCH_GONE, 1)}
    assert totals.spent_nanos == 3 * LINE_BOUND


@pytest.mark.parametrize("status", [401, 403])
def test_a_batch_whose_polls_are_refused_stays_held_logged_now_and_then_and_counted(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    # The company key revoked (401), or no longer allowed in the batch's project (403): the
    # batch may still run and be billed upstream, so it is never settled for it. Its polls
    # used to be answered with a warning every second, an hour long, and counted nowhere.
    caplog.set_level(logging.INFO, "tollgate.requests")
    metrics = Metrics(CollectorRegistry())
    hour = 3600
    rows, totals, held = follow_until(runtime, tmp_path, [status], hour, 1.0, metrics=metrics)
    assert held == [("b1", "batch_abc")]
    [row] = rows
    assert (row["state"], row["cost_nanos"]) == ("reserved", 0)
    assert (totals.spent_nanos, totals.reserved_nanos) == (0, 3 * LINE_BOUND)
    logged = [r for r in caplog.records if "batch_abc" in r.getMessage()]
    assert {r.levelno for r in logged} == {logging.ERROR}
    assert len(logged) == math.ceil(hour / REFUSED_LOG_EVERY_S)
    assert f"({status} " in logged[0].getMessage()
    assert metrics.batches_refused._value.get() == 1


def test_a_batch_read_again_after_refused_polls_is_no_longer_counted(
    runtime: Runtime, tmp_path: Path
) -> None:
    metrics = Metrics(CollectorRegistry())
    answers: list[int | Exception] = [401, 403, 500, 401, 200, 200]
    _, _, held = follow_until(runtime, tmp_path, answers, len(answers), 1.0, metrics=metrics)
    assert held == [("b1", "batch_abc")]
    assert metrics.batches_refused._value.get() == 0


def test_refused_polls_neither_count_nor_break_a_run_of_404s(
    runtime: Runtime, tmp_path: Path
) -> None:
    metrics = Metrics(CollectorRegistry())
    answers: list[int | Exception] = [404, 401] * (GONE_POLLS + 1)
    polls = len(answers)
    rows, _, held = follow_until(runtime, tmp_path, answers, polls, 120.0, metrics=metrics)
    assert held == []
    assert {(r["error_code"], r["flagged"]) for r in rows} == {(BATCH_GONE, 1)}
    assert metrics.batches_refused._value.get() == 0


def test_a_batch_gone_whose_lines_are_not_on_record_is_charged_its_whole_bound(
    runtime: Runtime, tmp_path: Path
) -> None:
    rows, totals, held = follow_until(runtime, tmp_path, [404], GONE_POLLS * 200, 1.0, None)
    assert held == []
    [row] = rows
    assert (row["state"], row["cost_nanos"], row["flagged"]) == ("settled", 3 * LINE_BOUND, 1)
    assert row["error_code"] == BATCH_GONE
    assert (totals.spent_nanos, totals.reserved_nanos) == (3 * LINE_BOUND, 0)


OUTPUT_LINE = {"custom_id": "req-1", "response": {"status_code": 200, "body": {"data": [{}]}}}


@dataclass
class Completed:
    """An upstream whose batch completed its three lines, its output file answered
    `output` (404: deleted since)."""

    output: int
    completed_at: float = CREATED + 60

    async def send(self, path: str, *_: Any, **__: Any) -> Any:
        if path.startswith("/files/"):
            if self.output == 404:
                return Answer(404, b'{"error": {"message": "No such File object."}}')
            return Answer(200, json.dumps(OUTPUT_LINE).encode() + b"\n")
        batch = {
            "id": "batch_abc", "object": "batch", "status": "completed",
            "completed_at": self.completed_at, "output_file_id": "file-out",
            "request_counts": {"total": 3, "completed": 3, "failed": 0},
        }  # fmt: skip
        return Answer(200, json.dumps(batch).encode())


@pytest.mark.parametrize(("output", "code"), [(404, OUTPUT_GONE), (200, MALFORMED_ANSWER)])
def test_a_completed_batch_whose_lines_are_not_on_record_is_charged_its_whole_bound(
    runtime: Runtime, tmp_path: Path, output: int, code: str
) -> None:
    """Its three lines billed, and its lines not on record (adopted, the batch's row
    gone): what it billed cannot be matched to a line. Its output gone, it was settled
    at nothing; read, each poll failed on a line it could not charge as any, its
    reservation held for good. The whole reservation is charged, flagged, as for a batch
    gone."""
    rows, totals, held = follow_until(
        runtime, tmp_path, [], 2, 1.0, None, upstream=Completed(output)
    )
    assert held == []
    [row] = rows
    assert (row["state"], row["cost_nanos"], row["flagged"]) == ("settled", 3 * LINE_BOUND, 1)
    assert row["error_code"] == code
    assert (totals.spent_nanos, totals.reserved_nanos) == (3 * LINE_BOUND, 0)


@dataclass
class Finalized(Completed):
    """The same, its output file made by OpenAI at `made_at`, while the batch finalized
    (None: the file's `GET /v1/files/{id}` answered 404)."""

    made_at: float | None = None
    reads: int = 0
    """`GET /v1/files/file-out` asked."""

    async def send(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if path != "/files/file-out":
            return await super().send(path, *args, **kwargs)
        self.reads += 1
        if self.made_at is None:
            return Answer(404, b'{"error": {"message": "No such File object."}}')
        made = {"id": "file-out", "object": "file", "purpose": "batch_output"}
        return Answer(200, json.dumps({**made, "created_at": self.made_at}).encode())


@pytest.mark.parametrize(
    ("made_at", "recorded_at"), [(CREATED + 3000, CREATED + 3000), (None, CREATED + 3600)]
)
def test_a_settled_batchs_output_file_is_recorded_at_openais_time_of_it(
    runtime: Runtime, tmp_path: Path, made_at: float | None, recorded_at: float
) -> None:
    """OpenAI made the output file while the batch finalized, ten minutes before it
    completed: recorded at that time, read once, not at the batch's end (a listing's jump
    takes the ledger's time of a file to be within a minute of OpenAI's); at the batch's
    end, as before, when that time cannot be read."""
    upstream = Finalized(200, CREATED + 3600, made_at)
    recorded: dict[str, Any] = {"file-out": None}
    rows, _, held = follow_until(
        runtime, tmp_path, [], 2, 1.0, upstream=upstream, recorded=recorded
    )
    assert held == [] and {r["custom_id"] for r in rows} >= {"req-1"}
    stored = recorded["file-out"]
    assert (stored.team, stored.purpose, stored.created_at) == (
        "design",
        "batch_output",
        recorded_at,
    )
    assert upstream.reads == 1


def test_a_settled_batch_is_checked_against_the_alert_thresholds(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A batch's spend crosses a budget's `alert_at` as any request's does: its team's and
    its lines' users' budgets are checked once it settles (it was never told, and a team
    spending through batches alone was never alerted)."""
    noted: list[Entry] = []
    rows, _, held = follow_until(
        runtime, tmp_path, [], 2, 1.0, upstream=Finalized(200, CREATED + 3600),
        alerts=SimpleNamespace(settled=noted.append),
    )  # fmt: skip
    assert held == [] and rows
    assert {e.team for e in noted} == {"design"}
    assert sorted(e.user or "" for e in noted) == sorted({r["user"] or "" for r in rows})


def test_a_line_is_charged_the_dearer_of_the_book_it_was_reserved_under_and_the_one_in_force(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A batch followed by the process that created it keeps the book it was reserved
    with: a reload that cut a rate while it ran does not settle it below that book."""
    usage = {
        "input_tokens": 10, "output_tokens": 200, "total_tokens": 210,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
    }  # fmt: skip
    raw = json.dumps(
        {"custom_id": "a", "response": {"status_code": 200, "body": {"data": [{}], "usage": usage}}}
    ).encode()
    reservation = Entry("tg_req_1", 1_800_000_000.0, "batches", "design")
    book = runtime.config.prices
    (tmp_path / "prices.yaml").write_text(price_book("150.00"))
    dearer = load_price_book(tmp_path / "prices.yaml")

    def charge(now: Runtime, reserved_under: PriceBook | None) -> int:
        rows = batch_charges.Rows(now.config, reservation, 1.8e9, "b", reserved_under)
        found = rows.billed({"a": LINE}, raw)
        assert found is not None
        return found.settlement.cost_nanos

    later = cast(Runtime, SimpleNamespace(config=replace(runtime.config, prices=dearer)))
    # 10 text input tokens at 2.50 and 200 image output tokens at 15.00 (batch rates) ...
    assert charge(runtime, None) == charge(runtime, book) == 25_000 + 3_000_000
    # ... or at 150.00, whichever book has it: the one reserved under or the one now.
    assert (
        charge(runtime, dearer) == charge(later, book) == charge(later, None) == 25_000 + 30_000_000
    )


def test_a_users_lines_are_charged_at_most_her_share_and_the_batch_at_most_its_bound() -> None:
    """Each user's counters hold her share of the batch's reservation: her lines are cut to
    what is left of it (flagged), as every line is to what is left of the reservation."""

    def charged(user: str | None, cost: int) -> BilledLine:
        entry = Entry(f"r-{user}-{cost}", CREATED, "batches", "design", user=user)
        return BilledLine(entry, Settlement(CREATED, "ok", 200, cost_nanos=cost), ())

    billed = [charged("alice", 60), charged("alice", 60), charged("bob", 30), charged(None, 50)]
    found = within(billed, 150, {"alice": 100, "bob": 40})
    assert [(b.settlement.cost_nanos, b.settlement.flagged) for b in found] == [
        (60, False),
        (40, True),
        (30, False),
        (20, True),
    ]


# -- a long batch settles off the event loop ---------------------------------------------


class Ticker:
    """Turns of the event loop, counted by a task that yields each time; `turned` is set
    once it has turned `wanted` times since `mark`."""

    def __init__(self, wanted: int = 3) -> None:
        self.turns, self.wanted, self.since = 0, wanted, 0
        self.turned = threading.Event()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.turns += 1
            if self.turns - self.since >= self.wanted:
                self.turned.set()

    def mark(self) -> int:
        self.since, at = self.turns, self.turns
        self.turned.clear()
        return at


@dataclass
class Chunked(Answer):
    """An answer whose body comes `size` bytes at a time."""

    size: int = 1

    async def chunks(self) -> AsyncIterator[bytes]:
        for at in range(0, len(self.body), self.size):
            yield self.body[at : at + self.size]


@dataclass
class ManyLines:
    """An upstream whose batch completed `lines` lines, each answered 200 with its usage
    (its output file `chunk` bytes at a time; None: at once)."""

    lines: int
    chunk: int | None = None

    async def send(self, path: str, *_: Any, **__: Any) -> Any:
        if path == "/files/file-out":
            made = {"id": "file-out", "object": "file", "created_at": CREATED + 50}
            return Answer(200, json.dumps(made).encode())
        if path.startswith("/files/"):
            usage = {"input_tokens": 10, "output_tokens": 200, "total_tokens": 210}
            body = {"data": [{}], "usage": usage}
            output = b"".join(
                json.dumps({"custom_id": f"req-{i}", "response": {"status_code": 200,
                            "request_id": f"req_{i}", "body": body}}).encode() + b"\n"
                for i in range(1, self.lines + 1)
            )  # fmt: skip
            return Answer(200, output) if self.chunk is None else Chunked(200, output, self.chunk)
        batch = {
            "id": "batch_abc", "object": "batch", "status": "completed",
            "completed_at": CREATED + 60, "output_file_id": "file-out",
            "request_counts": {"total": self.lines, "completed": self.lines, "failed": 0},
        }  # fmt: skip
        return Answer(200, json.dumps(batch).encode())


def settle_watched(
    runtime: Runtime, tmp_path: Path, lines: int, ticker: Ticker, chunk: int | None = None
) -> list[dict[str, Any]]:
    """A batch of `lines` lines reserved, held and settled, with `ticker` counting the event
    loop's turns meanwhile (its output file read `chunk` bytes at a time): its rows."""

    async def run() -> list[dict[str, Any]]:
        ledger = await open_ledger(f"sqlite:///{tmp_path / 'tollgate.db'}")
        turning = asyncio.create_task(ticker.run())
        try:
            await ledger.register(Owner("me", "host", 1))
            await ledger.own(input_file(lines=lines), [priced(i) for i in range(1, lines + 1)])
            await ledger.reserve(CREATION_COUNTERS, take_batch("b1", lines))
            await ledger.hold("b1", "batch_abc")
            here = SimpleNamespace(
                config=runtime.config, ledger=ledger, upstream=ManyLines(lines, chunk),
                clock=lambda: CREATED + 120, metrics=Metrics(CollectorRegistry()),
                alerts=SimpleNamespace(settled=lambda entry: None),
            )  # fmt: skip
            followed = BatchFollow(batch_entry("b1", lines), "batch_abc", "file-abc", None)
            assert await followed.poll(cast(Runtime, here))
            return [row async for row in ledger.export(0.0, float("inf"))]
        finally:
            turning.cancel()
            await ledger.close()

    return asyncio.run(run())


def test_a_long_batchs_lines_are_charged_while_the_event_loop_keeps_turning(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its output lines are parsed and charged, and their rows built, on a thread: the event
    loop serves meanwhile. Built on the loop, a 50,000-line batch kept every other request
    of the worker waiting for seconds."""
    ticker, seen = Ticker(), []
    charge = batch_charges.line_charge

    def watched(*args: Any) -> Any:
        at = ticker.mark()
        ticker.turned.wait(timeout=10)  # on the loop's thread, it never turns meanwhile
        seen.append(ticker.turns - at)
        return charge(*args)

    monkeypatch.setattr(batch_charges, "line_charge", watched)
    rows = settle_watched(runtime, tmp_path, 3, ticker)
    assert len(seen) == 3 and min(seen) >= ticker.wanted
    assert sorted(r["custom_id"] for r in rows) == ["req-1", "req-2", "req-3"]
    assert {(r["state"], r["flagged"]) for r in rows} == {("settled", 0)}


def test_a_long_batchs_rows_and_counter_sums_are_worked_out_while_the_loop_keeps_turning(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger works out the rows and counter sums of more than `THREAD_LINES` billed
    lines on a thread too, before its transaction."""
    ticker, seen = Ticker(), []
    billed = codecs.billed

    def watched(lines: Any) -> Any:
        at = ticker.mark()
        ticker.turned.wait(timeout=10)
        seen.append((len(lines), ticker.turns - at))
        return billed(lines)

    monkeypatch.setattr(codecs, "billed", watched)
    lines = codecs.THREAD_LINES + 1
    rows = settle_watched(runtime, tmp_path, lines, ticker)
    [(count, turns)] = seen
    assert count == lines and turns >= ticker.wanted
    assert len(rows) == lines
    assert sum(r["cost_nanos"] for r in rows) == sum(r["cost_nanos"] for r in rows[:1]) * lines


def test_a_long_batchs_output_file_is_split_into_lines_while_the_event_loop_keeps_turning(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its output file's chunks are filtered (their images emptied) and split into lines on
    a thread, a run of them at a time: read and split on the loop, a 50,000-line file's
    1,800 chunks kept it a second, mostly without a turn."""
    ticker, seen = Ticker(), []
    strings_filter = ShortStrings.filter

    def watched(self: ShortStrings, chunk: bytes) -> bytes:
        if not seen:
            at = ticker.mark()
            ticker.turned.wait(timeout=10)  # on the loop's thread, it never turns meanwhile
            seen.append(ticker.turns - at)
        return strings_filter(self, chunk)

    monkeypatch.setattr(ShortStrings, "filter", watched)
    monkeypatch.setattr(batch_follow, "FEED_BYTES", 500)
    rows = settle_watched(runtime, tmp_path, 12, ticker, chunk=97)
    assert seen[0] >= ticker.wanted
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(1, 13))
    assert {(r["state"], r["flagged"]) for r in rows} == {("settled", 0)}


def test_an_output_files_lines_are_whole_however_its_chunks_cut_them() -> None:
    """A line cut across chunks, and across runs of chunks fed apart, is one line; a last
    line without its newline is one too; blank lines are none."""
    image = b"x" * (CUSTOM_ID_BYTES + 1)
    body = b'{"custom_id": "a", "b64": "' + image + b'"}\n\n  \n{"custom_id": "b"}'
    for size in (1, 7, 4096, len(body)):
        read = OutputLines()
        pieces = [body[at : at + size] for at in range(0, len(body), size)]
        for at in range(0, len(pieces), 3):
            read.feed(pieces[at : at + 3])
        read.end()
        assert read.lines == [b'{"custom_id": "a", "b64": ""}', b'{"custom_id": "b"}']


def test_an_output_file_unreadable_part_way_keeps_the_lines_read_before() -> None:
    read = OutputLines()
    read.feed([b'{"custom_id": "a"}\n{"custom_id": "b", "n": '])
    with pytest.raises(OutputUnreadable):
        read.feed([b"1" * 200])
    assert read.lines == [b'{"custom_id": "a"}']
    with pytest.raises(OutputUnreadable):
        OutputLines("not on record").feed([b'{"custom_id": "a"}\n'])


def watch_shared_rows(monkeypatch: pytest.MonkeyPatch, ticker: Ticker) -> list[int]:
    """From now on, each working out of a shared counters text's rows (`codecs.counter_rows`)
    waits for the event loop to turn: the turns seen meanwhile, one item per call (none
    when it runs on the loop's thread, which never turns meanwhile)."""
    seen: list[int] = []
    rows_of = codecs.counter_rows

    def watched(text: str, *rest: Any) -> Any:
        if codecs.shared(text):
            at = ticker.mark()
            ticker.turned.wait(timeout=10)
            seen.append(ticker.turns - at)
        return rows_of(text, *rest)

    monkeypatch.setattr(codecs, "counter_rows", watched)
    return seen


USERS = 200
SHARED_READ = [user_counter(f"u{i}") for i in range(USERS)] + list(TEAM_COUNTERS)


def test_a_batch_naming_many_users_is_released_while_the_event_loop_keeps_turning(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the upstream never created is released: the rows of its users' counters are
    worked out on a thread, as its settlement's are, on either ledger."""
    ticker = Ticker()

    async def run() -> tuple[list[int], dict[Counter, Totals]]:
        ledger = await open_ledger(url)
        turning = asyncio.create_task(ticker.run())
        try:
            await reserve_shared(ledger, USERS, hold=False)
            seen = watch_shared_rows(monkeypatch, ticker)
            released = Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0)
            await ledger.settle("b1", released)
            return seen, await ledger.totals(SHARED_READ)
        finally:
            turning.cancel()
            await ledger.close()

    seen, totals = asyncio.run(run())
    assert len(seen) == 1 and seen[0] >= ticker.wanted
    assert set(totals.values()) == {Totals()}


def test_a_batch_naming_many_users_that_billed_nothing_settles_while_the_loop_keeps_turning(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that expired (or was cancelled, or failed) before any line ran: its settlement
    releases each user's share, worked out on a thread however few lines it bills, on
    either ledger (PostgreSQL worked them out on the loop, SQLite for up to `LONG_WRITE`
    lines)."""
    ticker = Ticker()

    async def run() -> tuple[list[int], dict[Counter, Totals]]:
        ledger = await open_ledger(url)
        turning = asyncio.create_task(ticker.run())
        try:
            await reserve_shared(ledger, USERS)
            seen = watch_shared_rows(monkeypatch, ticker)
            expired = Settlement(CREATED + 60.0, "upstream_error", 200, error_code="batch_expired")
            assert await ledger.settle_batch("b1", [], expired) == 1
            return seen, await ledger.totals(SHARED_READ)
        finally:
            turning.cancel()
            await ledger.close()

    seen, totals = asyncio.run(run())
    assert len(seen) == 1 and seen[0] >= ticker.wanted
    assert set(totals.values()) == {Totals()}


def test_request_ids_made_many_at_once_are_distinct_and_shaped_as_one_at_a_time() -> None:
    shape = re.compile(r"tg_req_[0-9a-f]{32}")
    many = new_request_ids(1000)
    assert len(set(many)) == 1000
    assert all(shape.fullmatch(i) for i in [*many, new_request_id()])
    assert len(new_request_ids(0)) == 1
