"""A batch whose upstream answers what OpenAI never writes is still settled, once, within
the windows its reservation held room in.

The upstream here is a small scripted stand-in served from this process (the simulator
answers as OpenAI does): it takes the upload and the create, then reports the batch
ended with the end time and output file each test sets. Tollgate runs as a real process
in front of it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.batches_e2e import DAY, line, settled_rows, upload
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Tollgate,
    serving,
    start_tollgate,
    wait_for,
    write_config,
)

USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 196,
    "total_tokens": 208,
}
LINES = [
    line(name, {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low",
                "size": "1024x1024"})
    for name in ("a", "b")
]  # fmt: skip


class Upstream:
    """The batch's end as each test sets it: the batch's fields and its output file."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.created: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, Any] = {}
        self.output = b""
        self.unnamed = False
        """Whether a create is answered with its batch without its id."""
        self.polls = 0

    async def upload(self, request: Request) -> Response:
        form = await request.form()
        purpose = form["purpose"]
        return JSONResponse({
            "id": f"file-in{next(self.ids)}", "object": "file", "purpose": purpose,
            "bytes": 1, "created_at": int(time.time()), "filename": "in.jsonl",
            "status": "processed",
        })  # fmt: skip

    async def create(self, request: Request) -> Response:
        fields = await request.json()
        batch = {
            "id": f"batch_{next(self.ids)}", "object": "batch", "endpoint": fields["endpoint"],
            "input_file_id": fields["input_file_id"], "completion_window": "24h",
            "status": "validating", "created_at": int(time.time()),
        }  # fmt: skip
        self.created[batch["id"]] = batch
        return JSONResponse({k: v for k, v in batch.items() if k != "id" or not self.unnamed})

    async def listing(self, request: Request) -> Response:
        newest = sorted(self.created.values(), key=lambda b: b["created_at"], reverse=True)
        return JSONResponse({"object": "list", "data": newest, "has_more": False})

    async def retrieve(self, request: Request) -> Response:
        batch = self.created[request.path_params["batch_id"]]
        self.polls += 1
        return JSONResponse({**batch, "output_file_id": "file-out", **self.ended})

    async def content(self, request: Request) -> Response:
        return Response(self.output, media_type="application/octet-stream")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/files", self.upload, methods=["POST"]),
                Route("/v1/batches", self.create, methods=["POST"]),
                Route("/v1/batches", self.listing, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
                Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
            ]
        )


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("hostile-batches")
    with serving(upstream.app()) as url:
        write_config(root, f"{url}/v1", "timezone: UTC\n")
        tollgate = start_tollgate(root)
        yield tollgate
        tollgate.stop()


def output_line(custom_id: str) -> str:
    body = {"created": 1, "data": [{"b64_json": "aGk="}], "usage": USAGE}
    response = {"status_code": 200, "request_id": f"req_{custom_id}", "body": body}
    return json.dumps({"id": "r", "custom_id": custom_id, "response": response, "error": None})


def run(
    proxy: Tollgate,
    upstream: Upstream,
    ended: dict[str, Any],
    output: list[str],
    key: str = DESIGN_KEY,
) -> Any:
    """A batch of `LINES` that ends as `ended` says, with `output` as its output file, made
    with `key`; its rows once settled, and when it was created."""
    upstream.ended, upstream.output = ended, "".join(f"{x}\n" for x in output).encode()
    sdk = proxy.client(key)
    uploaded = upload(sdk, LINES)
    before = time.time()
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    return settled_rows(proxy, batch.id), before


@pytest.mark.parametrize("reported", [1, -5, 0.5, "soon", True, None, [1]])
def test_lines_are_booked_within_the_span_their_reservation_held(
    proxy: Tollgate, upstream: Upstream, reported: Any
) -> None:
    """An end before the batch's creation (a wrong or skewed clock; 0 would book it in
    1970, in a day and a month whose budgets never held it) or one that is no time at all
    is booked when the batch was created or read, never outside its reservation's span."""
    ended = {"status": "completed", "completed_at": reported}
    rows, created = run(proxy, upstream, ended, [output_line("a"), output_line("b")])
    assert sorted(r["custom_id"] for r in rows) == ["a", "b"]
    for row in rows:
        assert created - 5 <= row["started_at"] <= time.time() + 5
        assert row["cost_nanos"] > 0
    day = int(rows[0]["started_at"]) // DAY * DAY
    [spent] = proxy.query(
        "SELECT spent_nanos FROM budget_usage WHERE scope = 'team' AND team = 'design' "
        f"AND period = 'day' AND start = {day}"
    )
    assert spent["spent_nanos"] >= sum(r["cost_nanos"] for r in rows)


@pytest.mark.parametrize(
    "unreadable",
    [
        "this is not json{",
        json.dumps({"custom_id": "b", "response": "ok"}),
        json.dumps({"custom_id": "b", "response": {"status_code": "200", "body": {}}}),
        json.dumps({"custom_id": "b", "response": None, "error": None}),
        json.dumps(["b"]),
    ],
)
def test_an_unreadable_output_line_is_charged_a_bound_flagged_and_the_batch_settled(
    proxy: Tollgate, upstream: Upstream, unreadable: str
) -> None:
    """A line OpenAI never writes may still be a line it billed: charged the bound of the
    line it names (the dearest when it names none), flagged, instead of the batch being
    read again and again and its reservation held for good."""
    ended = {"status": "completed", "completed_at": int(time.time())}
    rows, _ = run(proxy, upstream, ended, [output_line("a"), unreadable])
    by_code = {r["error_code"]: r for r in rows}
    assert len(rows) == 2 and set(by_code) == {None, "malformed_answer"}
    assert by_code[None]["flagged"] == 0
    charged = by_code["malformed_answer"]
    assert (charged["flagged"], charged["cost_nanos"]) == (1, charged["estimated_nanos"])
    assert charged["cost_nanos"] > 0
    assert all(r["reserved_nanos"] == 0 and r["held"] == 0 for r in rows)


def test_an_error_line_is_not_billed(proxy: Tollgate, upstream: Upstream) -> None:
    expired = {"code": "batch_expired", "message": "not run"}
    error = json.dumps({"custom_id": "b", "response": None, "error": expired})
    failed = json.dumps({"custom_id": "b", "response": {"status_code": 400, "body": {}}})
    ended = {"status": "expired", "expired_at": int(time.time())}
    for other in (error, failed):
        rows, _ = run(proxy, upstream, ended, [output_line("a"), other])
        assert [(r["custom_id"], r["flagged"]) for r in rows] == [("a", 0)]


def test_an_empty_error_file_id_is_no_file_and_every_teams_batch_is_settled(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """OpenAI has answered `error_file_id: ""` for a batch without failed lines: that is
    no file, and no team's. Recorded as the first team's, it made the settlement of every
    other team's batch fail for good (another team's file), its reservation held."""
    ended = {"status": "completed", "completed_at": int(time.time()), "error_file_id": ""}
    for key in (DESIGN_KEY, RESEARCH_KEY):
        rows, _ = run(proxy, upstream, ended, [output_line("a"), output_line("b")], key)
        assert [(r["custom_id"], r["flagged"]) for r in rows] == [("a", 0), ("b", 0)]
    assert proxy.query("SELECT id FROM stored_objects WHERE id = ''") == []


@pytest.mark.parametrize("output", [None, ""])
def test_completed_lines_without_an_output_file_are_charged_their_bounds_flagged(
    proxy: Tollgate, upstream: Upstream, output: str | None
) -> None:
    """A batch that says lines completed but names no output file to read them from was
    billed for them: each line is charged its bound, flagged, never nothing."""
    counts = {"total": 2, "completed": 2, "failed": 0}
    ended = {
        "status": "completed", "completed_at": int(time.time()), "output_file_id": output,
        "request_counts": counts,
    }  # fmt: skip
    rows, _ = run(proxy, upstream, ended, [])
    assert len(rows) == 2
    for row in rows:
        assert (row["flagged"], row["error_code"]) == (1, "batch_output_gone")
        assert row["cost_nanos"] == row["estimated_nanos"] > 0


def test_an_output_file_that_cannot_be_read_past_a_point_is_settled_at_the_lines_bounds(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """A number longer than any usage holds (refused before it reaches the JSON parser)
    made every reading of the file fail, the batch never settled; the lines not read are
    charged their bounds, flagged."""
    ended = {"status": "completed", "completed_at": int(time.time())}
    absurd = output_line("b").replace('"output_tokens": 196', '"output_tokens": ' + "9" * 200)
    rows, _ = run(proxy, upstream, ended, [output_line("a"), absurd])
    assert sorted(r["custom_id"] for r in rows) == ["a", "b"]
    for row in rows:
        assert (row["flagged"], row["error_code"]) == (1, "malformed_answer")
        assert row["cost_nanos"] == row["estimated_nanos"] > 0


def test_a_line_answered_twice_is_charged_as_read_and_flagged(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """OpenAI answers each line once: a second answer to one is charged (never less than
    the upstream may have billed, within the reservation) but flagged for reconciliation,
    where it was booked as a line of its own."""
    ended = {"status": "completed", "completed_at": int(time.time())}
    rows, _ = run(proxy, upstream, ended, [output_line("a"), output_line("a")])
    assert sorted((r["custom_id"], r["flagged"], r["error_code"]) for r in rows) == [
        ("a", 0, None),
        ("a", 1, "batch_line_repeated"),
    ]
    assert rows[0]["cost_nanos"] == rows[1]["cost_nanos"] > 0


def test_a_line_billed_above_its_bound_is_charged_as_read_and_flagged(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """A line whose usage costs more than it was priced at upload (an upstream billing past
    Tollgate's token rules) is charged as it reads, and flagged `usage_over_bound` as a
    direct request's answer is, even when the batch as a whole stays within its
    reservation (here, its other line not billed): it was charged silently."""
    over = output_line("a").replace('"output_tokens": 196', '"output_tokens": 300')
    expired = {"code": "batch_expired", "message": "not run"}
    error = json.dumps({"custom_id": "b", "response": None, "error": expired})
    ended = {"status": "expired", "expired_at": int(time.time())}
    rows, _ = run(proxy, upstream, ended, [over, error])
    [row] = rows
    assert row["estimated_nanos"] < row["cost_nanos"] < 2 * row["estimated_nanos"]
    assert (row["flagged"], row["error_code"]) == (1, "usage_over_bound")
    assert row["image_output_tokens"] == 300


def test_an_output_file_short_of_the_lines_the_batch_completed_charges_the_others_bounds(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """A batch that says two lines completed (billed) with an output file answering one
    (cut short on its way): the other was billed too, at a cost unknown. It was charged
    nothing; every line the file does not answer is charged its bound, flagged."""
    counts = {"total": 2, "completed": 2, "failed": 0}
    ended = {"status": "completed", "completed_at": int(time.time()), "request_counts": counts}
    rows, _ = run(proxy, upstream, ended, [output_line("a")])
    by_line = {r["custom_id"]: r for r in rows}
    assert sorted(by_line) == ["a", "b"]
    assert (by_line["a"]["flagged"], by_line["a"]["error_code"]) == (0, None)
    short = by_line["b"]
    assert (short["flagged"], short["error_code"]) == (1, "malformed_answer")
    assert short["cost_nanos"] == short["estimated_nanos"] > 0


def test_an_output_file_answering_every_completed_line_charges_no_other(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """The lines the batch did not complete (failed, in its error file) are not billed."""
    counts = {"total": 2, "completed": 1, "failed": 1}
    ended = {"status": "completed", "completed_at": int(time.time()), "request_counts": counts}
    rows, _ = run(proxy, upstream, ended, [output_line("a")])
    assert [(r["custom_id"], r["flagged"]) for r in rows] == [("a", 0)]


def test_a_create_answered_without_its_batchs_id_follows_the_batch_it_made(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """A create answered 200 with a batch that has no id made a batch all the same, which
    runs and bills: it was neither followed nor released, its lines never settled and its
    reservation left to be reclaimed at its bound. It is found among the upstream's
    batches, the team's, and settled by its lines."""
    upstream.ended = {"status": "completed", "completed_at": int(time.time())}
    upstream.output = "".join(f"{output_line(x)}\n" for x in ("a", "b")).encode()
    upstream.unnamed = True
    try:
        sdk = proxy.client(DESIGN_KEY)
        uploaded = upload(sdk, LINES)
        sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )
    finally:
        upstream.unnamed = False
    [made] = [b["id"] for b in upstream.created.values() if b["input_file_id"] == uploaded.id]
    rows = settled_rows(proxy, made)
    assert [(r["custom_id"], r["flagged"]) for r in rows] == [("a", 0), ("b", 0)]
    assert sdk.batches.retrieve(made).id == made
    assert made not in {b.id for b in proxy.client(RESEARCH_KEY).batches.list()}


def test_a_poll_answered_with_another_batch_is_not_settled_from_it(
    proxy: Tollgate, upstream: Upstream
) -> None:
    """A poll of a batch answered with another batch's object, ended (a cache or proxy
    before the upstream answering for the wrong path), settled this batch from the other's
    output file: charged its lines, and its team given that file. It is asked again until
    the upstream answers for the batch itself."""
    upstream.output = "".join(f"{output_line(x)}\n" for x in ("a", "b")).encode()
    upstream.ended = {
        "id": "batch_someone_elses", "status": "completed", "completed_at": int(time.time()),
        "output_file_id": "file-someone-elses",
    }  # fmt: skip
    sdk = proxy.client(DESIGN_KEY)
    batch = sdk.batches.create(
        input_file_id=upload(sdk, LINES).id,
        endpoint="/v1/images/generations",
        completion_window="24h",
    )
    polls = upstream.polls

    def states() -> list[str] | None:
        rows = proxy.query(f"SELECT state FROM requests WHERE response_id = '{batch.id}'")
        found = [r["state"] for r in rows]
        return found if upstream.polls >= polls + 2 or "settled" in found else None

    assert wait_for("two polls of the batch, or its settlement", states) == ["reserved"]
    sdk.batches.retrieve(batch.id)  # the team reads it as the upstream answers it
    assert proxy.query("SELECT id FROM stored_objects WHERE id = 'file-someone-elses'") == []
    upstream.ended = {"status": "completed", "completed_at": int(time.time())}
    rows = settled_rows(proxy, batch.id)
    assert [(r["custom_id"], r["flagged"]) for r in rows] == [("a", 0), ("b", 0)]
