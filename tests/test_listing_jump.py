"""A listing past long runs of other teams' objects (`proxy.web.files.jump`): the SDK's
auto-pagination stops at an empty page, so a run of other teams' objects longer than the
pages a listing reads must not end the team's listing while the team has more.

In process, in front of a scripted upstream whose clock the test sets: each object's
`created_at` there, and the ledger's time of it (Tollgate's clock) up to a minute apart.
The pages a listing reads are made small (`SKIPPED_PAGES`, `UPSTREAM_PAGE`), so short runs
of other teams' objects already pass them.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web import files as files_module
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    in_process,
    write_config,
)

TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
}
START = 1_790_000_000


@dataclass
class Upstream:
    """OpenAI's files, as far as a listing sees them: cursor pages newest first (or oldest
    first with `order=asc`), ties in the order of creation (newest first: the last made
    first); `GET /v1/files/{id}`; 404 for an object it no longer has."""

    now: int = START
    files: list[dict[str, Any]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    pages: int = 0
    reads: int = 0
    count: itertools.count[int] = field(default_factory=itertools.count)

    def make(self, purpose: str = "user_data") -> dict[str, Any]:
        made = {
            "id": f"file-{next(self.count):06d}", "object": "file", "bytes": 1,
            "created_at": self.now, "filename": "x.txt", "purpose": purpose,
            "status": "processed",
        }  # fmt: skip
        self.files.append(made)
        return made

    def app(self) -> Starlette:
        async def upload(request: Request) -> Response:
            form = await request.form()
            return JSONResponse(self.make(str(form["purpose"])))

        async def listing(request: Request) -> Response:
            self.pages += 1
            query = request.query_params
            purpose = query.get("purpose")
            alive = [
                f for f in self.files
                if f["id"] not in self.gone and purpose in (None, f["purpose"])
            ]  # fmt: skip
            ordered = sorted(alive, key=lambda f: f["created_at"])  # stable: creation order
            if query.get("order", "desc") == "desc":
                ordered.reverse()
            after = query.get("after")
            if after is not None:
                ids = [f["id"] for f in ordered]
                ordered = ordered[ids.index(after) + 1 :] if after in ids else []
            limit = int(query["limit"])
            page = ordered[:limit]
            return JSONResponse({
                "object": "list", "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ordered) > limit,
            })  # fmt: skip

        async def one(request: Request) -> Response:
            self.reads += 1
            wanted = request.path_params["file_id"]
            for f in self.files:
                if f["id"] == wanted and wanted not in self.gone:
                    return JSONResponse(f)
            error = {"message": f"No such File object: {wanted}", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=404)

        return Starlette(
            routes=[
                Route("/v1/files", upload, methods=["POST"]),
                Route("/v1/files", listing, methods=["GET"]),
                Route("/v1/files/{file_id}", one, methods=["GET"]),
            ]
        )


@dataclass
class World:
    upstream: Upstream
    clock: list[float]
    http: TestClient
    uploads: int = 0

    def sdk(self, key: str = DESIGN_KEY) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key, base_url="http://testserver/v1", http_client=self.http, max_retries=0
        )

    def upload(self, key: str = DESIGN_KEY, purpose: str = "user_data", skew: float = 0) -> str:
        """A file made through Tollgate at the upstream's now, which the ledger records
        `skew` seconds later on its own clock (and a millisecond after the one before, as
        uploads one after the other are)."""
        self.uploads += 1
        self.clock[0] = self.upstream.now + skew + self.uploads / 1000
        made = self.sdk(key).files.create(file=("x.txt", io.BytesIO(b"x")), purpose=purpose)  # type: ignore[arg-type]
        return made.id

    def direct(self, count: int) -> list[str]:
        """Files made straight upstream (no team's)."""
        return [self.upstream.make()["id"] for _ in range(count)]

    def listed(self, limit: int, **query: Any) -> list[str]:
        return [f.id for f in self.sdk().files.list(limit=limit, **query)]

    def pages(self, limit: int, **query: Any) -> list[dict[str, Any]]:
        found, after = [], None
        while True:
            params = {"limit": limit, **query, **({"after": after} if after else {})}
            page = self.http.get(
                "/v1/files", params=params, headers={"authorization": f"Bearer {DESIGN_KEY}"}
            )
            assert page.status_code == 200, page.text
            found.append(page.json())
            if not found[-1]["has_more"] or not found[-1]["data"]:
                return found
            after = found[-1]["last_id"]


@pytest.fixture
def short_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing reads 2 pages of 3 objects before it jumps."""
    monkeypatch.setattr(files_module, "SKIPPED_PAGES", 1)
    monkeypatch.setattr(files_module, "UPSTREAM_PAGE", 3)


@pytest.fixture
def world(tmp_path: Path, short_pages: None) -> Iterator[World]:
    write_config(tmp_path, "http://simulated/v1", teams=TEAMS)
    upstream = Upstream()
    clock = [float(START)]
    app = in_process(tmp_path, upstream.app(), clock=lambda: clock[0])
    with TestClient(app) as http:
        yield World(upstream, clock, http)


def upstream_order(world: World, ids: set[str], order: str = "desc") -> list[str]:
    """`ids` in the order the upstream lists them (those it still has)."""
    alive = [
        f for f in world.upstream.files if f["id"] in ids and f["id"] not in world.upstream.gone
    ]
    ordered = sorted(alive, key=lambda f: f["created_at"])
    if order == "desc":
        ordered.reverse()
    return [f["id"] for f in ordered]


def test_a_run_of_other_teams_files_longer_than_a_listing_reads_does_not_end_it(
    world: World,
) -> None:
    mine = [world.upload() for _ in range(2)]
    world.upstream.now += 10
    world.direct(20)  # more than the 6 a listing reads before it jumps
    world.upstream.now += 10
    mine.append(world.upload())
    assert world.listed(limit=1) == list(reversed(mine))
    assert world.listed(limit=5) == list(reversed(mine))
    assert world.listed(limit=2, order="asc") == mine


def test_a_team_with_nothing_past_a_long_run_is_told_it_has_no_more(world: World) -> None:
    """The pages before the jump held none of the team's files and more remained upstream:
    the ledger says there are none past them, so the page says so (it said `has_more`)."""
    world.direct(10)
    world.upstream.now += 5
    mine = world.upload()
    world.upstream.now += 5
    world.direct(10)
    pages = world.pages(limit=3, order="asc")
    assert [f["id"] for p in pages for f in p["data"]] == [mine]
    assert pages[-1]["has_more"] is False
    reads = world.upstream.reads
    pages = world.pages(limit=3)  # newest first: the file is past the run
    assert [f["id"] for p in pages for f in p["data"]] == [mine]
    assert pages[-1]["has_more"] is False
    assert world.upstream.reads > reads  # found by a jump


def test_files_gone_upstream_are_read_past_and_others_purposes_left_out(world: World) -> None:
    vision = [world.upload(purpose="vision")]
    world.upstream.now += 1
    gone = world.upload()
    world.upstream.now += 1
    kept = world.upload()
    world.upstream.now += 1
    vision.append(world.upload(purpose="vision"))
    world.upstream.now += 1
    world.direct(12)
    world.upstream.gone.add(gone)
    assert world.listed(limit=2) == [vision[1], kept, vision[0]]
    assert world.listed(limit=1, purpose="vision") == [vision[1], vision[0]]


def test_files_made_in_the_same_second_are_all_listed_once(world: World) -> None:
    mine = [world.upload(skew=0.1 * i) for i in range(4)]  # one upstream second
    world.upstream.now += 1
    world.direct(9)
    for limit in (1, 2, 3, 10):
        assert world.listed(limit=limit) == list(reversed(mine))
        assert world.listed(limit=limit, order="asc") == mine


def test_other_teams_files_are_never_jumped_to(world: World) -> None:
    design = world.upload()
    world.upstream.now += 1
    research = [world.upload(RESEARCH_KEY) for _ in range(3)]
    world.upstream.now += 1
    world.direct(8)
    assert world.listed(limit=4) == [design]
    listed = [f.id for f in world.sdk(RESEARCH_KEY).files.list(limit=1)]
    assert listed == list(reversed(research))


def test_a_jump_reads_a_bounded_number_of_objects(world: World) -> None:
    """The team's files the upstream no longer has are read past, up to `JUMP_READS`; past
    that the listing ends as before, with `has_more`, and says so in the log."""
    mine = [world.upload() for _ in range(files_module.JUMP_READS + 5)]
    world.upstream.now += 1
    world.direct(7)
    world.upstream.gone.update(mine[5:])
    reads = world.upstream.reads
    pages = world.pages(limit=2)
    assert pages[-1]["data"] == [] and pages[-1]["has_more"] is True
    assert world.upstream.reads - reads == files_module.JUMP_READS


LAYOUTS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
"""The hypothesis settings of the tests drawing layouts of files and clocks."""


@LAYOUTS
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["design", "research", "direct"]),
            st.integers(1, 9),  # how many
            st.integers(0, 200),  # seconds before them
        ),
        min_size=1,
        max_size=8,
    ),
    skew=st.floats(-59, 59),  # the ledger's clock against the upstream's
    limit=st.sampled_from([1, 2, 3, 7]),
    order=st.sampled_from(["desc", "asc"]),
)
def test_every_own_file_is_listed_once_in_the_upstreams_order(
    tmp_path_factory: pytest.TempPathFactory,
    short_pages: None,
    plan: list[tuple[str, int, int]],
    skew: float,
    limit: int,
    order: str,
) -> None:
    root = tmp_path_factory.mktemp("jump")
    write_config(root, "http://simulated/v1", teams=TEAMS)
    upstream = Upstream()
    clock = [float(START)]
    with TestClient(in_process(root, upstream.app(), clock=lambda: clock[0])) as http:
        world = World(upstream, clock, http)
        mine: set[str] = set()
        for owner, count, gap in plan:
            upstream.now += gap
            for _ in range(count):
                if owner == "direct":
                    world.direct(1)
                else:
                    made = world.upload(
                        DESIGN_KEY if owner == "design" else RESEARCH_KEY, skew=skew
                    )
                    if owner == "design":
                        mine.add(made)
        assert world.listed(limit=limit, order=order) == upstream_order(world, mine, order)
        for page in world.pages(limit=limit, order=order):
            assert {page["first_id"], page["last_id"]} <= {None, *mine}
            assert set(f["id"] for f in page["data"]) <= mine


def test_the_ledgers_order_may_differ_from_the_upstreams_within_a_minute(world: World) -> None:
    """Files recorded by the ledger out of the upstream's order (one answered 40 s late):
    the jump reads every candidate that could come first, and takes the upstream's order."""
    first = world.upload(skew=40)  # upstream 0, ledger +40
    world.upstream.now += 2
    second = world.upload(skew=-15)  # upstream 2, ledger -13: before `first` in the ledger
    world.upstream.now += 2
    world.direct(9)
    assert world.listed(limit=1) == [second, first]
    assert world.listed(limit=3, order="asc") == [first, second]
    world.upstream.now += 2
    third = world.upload(skew=-30)  # upstream 6, ledger -24: before both in the ledger
    world.upstream.now += 2
    world.direct(9)
    assert world.listed(limit=1) == [third, second, first]
    assert world.listed(limit=2, order="asc") == [first, second, third]


def test_the_page_is_json_of_openais_shape(world: World) -> None:
    mine = world.upload()
    world.upstream.now += 1
    world.direct(8)
    page = world.http.get(
        "/v1/files", params={"limit": 5}, headers={"authorization": f"Bearer {DESIGN_KEY}"}
    )
    assert json.loads(page.content) == {
        "object": "list", "data": [world.upstream.files[0]], "first_id": mine,
        "last_id": mine, "has_more": False,
    }  # fmt: skip
    assert httpx.Headers(page.headers)["x-tollgate-team"] == "design"


def test_batches_past_a_long_run_of_others_are_listed_through_the_sdk(
    tmp_path: Path, short_pages: None
) -> None:
    """The same for `GET /v1/batches`, in front of the simulator: batches made straight
    upstream between the team's."""
    write_config(tmp_path, "http://simulated/v1", teams=TEAMS)
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    line = {"model": "gpt-image-2", "prompt": "a", "quality": "low", "size": "1024x1024"}
    body = json.dumps(
        {"custom_id": "c", "method": "POST", "url": "/v1/images/generations", "body": line}
    ).encode()
    with (
        TestClient(in_process(tmp_path, simulator)) as http,
        TestClient(simulator, headers={"authorization": f"Bearer {UPSTREAM_KEY}"}) as direct,
    ):
        sdk = openai.OpenAI(
            api_key=DESIGN_KEY, base_url="http://testserver/v1", http_client=http, max_retries=0
        )

        def mine() -> str:
            made = sdk.files.create(file=("in.jsonl", io.BytesIO(body)), purpose="batch")
            return sdk.batches.create(
                input_file_id=made.id, endpoint="/v1/images/generations", completion_window="24h"
            ).id

        def theirs(count: int) -> None:
            made = direct.post(
                "/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"}
            )
            for _ in range(count):
                direct.post(
                    "/v1/batches",
                    json={
                        "input_file_id": made.json()["id"],
                        "completion_window": "24h",
                        "endpoint": "/v1/images/generations",
                    },
                ).raise_for_status()

        made = [mine()]
        theirs(8)
        made.append(mine())
        theirs(8)
        assert [b.id for b in sdk.batches.list(limit=1)] == list(reversed(made))


def test_a_file_in_the_cursors_second_recorded_late_is_listed_after_an_earlier_page(
    world: World,
) -> None:
    """The run of other teams' files read after one of the team's ends in the second of
    another of the team's files, which the ledger recorded later than the first (its answer
    came 40 s late): that file is past the run, whatever the ledger's order of the two, as
    the page was asked after a file of another second."""
    late = world.upload(skew=40)  # upstream 0, ledger +40
    world.direct(2)  # the same second, made after it: before it newest first
    world.upstream.now += 10
    world.direct(4)
    world.upstream.now += 10
    prompt = world.upload()  # upstream 20, ledger 20: before `late` in the ledger
    assert world.listed(limit=1) == [prompt, late]
    assert world.listed(limit=2) == [prompt, late]


def test_oldest_first_a_file_in_the_cursors_second_recorded_early_is_listed(
    world: World,
) -> None:
    late = world.upload(skew=40)  # upstream 0, ledger +40
    world.upstream.now += 10
    world.direct(4)
    world.upstream.now += 10
    world.direct(2)
    prompt = world.upload()  # upstream 20, ledger 20: before `late` in the ledger
    world.direct(1)  # after it oldest first: the run goes on past its second
    assert world.listed(limit=1, order="asc") == [late, prompt]


def test_a_run_all_in_the_cursors_second_reads_the_file_it_was_asked_after(
    world: World,
) -> None:
    """Every file the run read is in the cursor's second: whether the file the page was
    asked after is too is read upstream (it is not here), one read more."""
    late = world.upload(skew=40)  # upstream 0, ledger +40
    world.direct(7)  # the same second, made after it: before it newest first
    world.upstream.now += 10
    prompt = world.upload()  # upstream 10, ledger 10: before `late` in the ledger
    reads = world.upstream.reads
    pages = world.pages(limit=1)
    assert [f["id"] for p in pages for f in p["data"]] == [prompt, late]
    assert world.upstream.reads - reads == 2  # `prompt`, then `late`


@dataclass
class BatchUpstream(Upstream):
    """The same upstream with batches, listed newest first. A create can be made to run
    upstream for `hang_s` seconds of Tollgate's clock and its answer then be lost (an
    answer Tollgate cannot read)."""

    batches: list[dict[str, Any]] = field(default_factory=list)
    clock: list[float] = field(default_factory=lambda: [float(START)])
    hang_s: float = 0

    def batch(self, file_id: str) -> dict[str, Any]:
        made = {
            "id": f"batch_{next(self.count):06d}", "object": "batch",
            "endpoint": "/v1/images/generations", "input_file_id": file_id,
            "completion_window": "24h", "status": "in_progress", "created_at": self.now,
        }  # fmt: skip
        self.batches.append(made)
        return made

    def app(self) -> Starlette:
        async def create(request: Request) -> Response:
            made = self.batch((await request.json())["input_file_id"])
            if self.hang_s:
                self.clock[0] += self.hang_s
                self.hang_s = 0
                return JSONResponse(made, headers={"content-encoding": "x-lost"})
            return JSONResponse(made)

        async def listing(request: Request) -> Response:
            ordered = sorted(self.batches, key=lambda b: b["created_at"])[::-1]
            after = request.query_params.get("after")
            if after is not None:
                ids = [b["id"] for b in ordered]
                ordered = ordered[ids.index(after) + 1 :] if after in ids else []
            page = ordered[: int(request.query_params["limit"])]
            return JSONResponse({
                "object": "list", "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ordered) > len(page),
            })  # fmt: skip

        async def one(request: Request) -> Response:
            for b in self.batches:
                if b["id"] == request.path_params["batch_id"]:
                    return JSONResponse(b)
            return JSONResponse({"error": {"message": "No such Batch"}}, status_code=404)

        return Starlette(
            routes=[
                *super().app().routes,
                Route("/v1/batches", create, methods=["POST"]),
                Route("/v1/batches", listing, methods=["GET"]),
                Route("/v1/batches/{batch_id}", one, methods=["GET"]),
            ]
        )


def test_a_batch_found_after_its_create_lost_its_answer_is_jumped_to(
    tmp_path: Path, short_pages: None
) -> None:
    """A create whose answer was lost after 5 minutes, its batch found upstream: recorded
    at OpenAI's `created_at`, not at the end of those 5 minutes, which a listing's jump past
    other teams' batches created meanwhile would look past."""
    write_config(tmp_path, "http://simulated/v1", teams=TEAMS)
    upstream = BatchUpstream()
    app = in_process(tmp_path, upstream.app(), clock=lambda: upstream.clock[0])
    line = {"model": "gpt-image-2", "prompt": "a", "quality": "low", "size": "1024x1024"}
    body = json.dumps(
        {"custom_id": "c", "method": "POST", "url": "/v1/images/generations", "body": line}
    ).encode()
    with TestClient(app) as http:
        sdk = openai.OpenAI(
            api_key=DESIGN_KEY, base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        made = sdk.files.create(file=("in.jsonl", io.BytesIO(body)), purpose="batch")
        upstream.hang_s = 300
        with pytest.raises(openai.APIStatusError):
            sdk.batches.create(
                input_file_id=made.id, endpoint="/v1/images/generations", completion_window="24h"
            )
        [mine] = [b["id"] for b in upstream.batches]
        assert sdk.batches.retrieve(mine).id == mine  # found, and the team's
        upstream.now += 10  # while the create hung
        for _ in range(7):
            upstream.batch("file-theirs")
        assert [b.id for b in sdk.batches.list(limit=1)] == [mine]


@LAYOUTS
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["design", "research", "direct"]),
            st.integers(1, 9),  # how many
            st.sampled_from([0, 0, 0, 5, 100]),  # seconds before them
            st.lists(st.floats(-59, 59), min_size=9, max_size=9),  # each one's skew
        ),
        min_size=1,
        max_size=8,
    ),
    limit=st.sampled_from([1, 2, 3, 7]),
    order=st.sampled_from(["desc", "asc"]),
)
@example(
    plan=[
        *[("design", 1, 0, [0.0] * 9)] * 3,
        ("design", 1, 0, [2.0] + [0.0] * 8),
        ("research", 6, 0, [0.0] * 9),
        ("design", 1, 0, [0.0] * 9),
    ],
    limit=1,
    order="desc",
)
def test_every_own_file_is_listed_once_whatever_each_ones_skew(
    tmp_path_factory: pytest.TempPathFactory,
    short_pages: None,
    plan: list[tuple[str, int, int, list[float]]],
    limit: int,
    order: str,
) -> None:
    """Each of the team's files recorded by the ledger up to a minute from OpenAI's time of
    it, each its own way, the team's files each in a second of their own (the one order
    there is for two in the same second is the ledger's); other teams' in any."""
    root = tmp_path_factory.mktemp("skews")
    write_config(root, "http://simulated/v1", teams=TEAMS)
    upstream = Upstream()
    clock = [float(START)]
    with TestClient(in_process(root, upstream.app(), clock=lambda: clock[0])) as http:
        world = World(upstream, clock, http)
        mine: set[str] = set()
        second = -1  # of the team's last file
        for owner, count, gap, skews in plan:
            upstream.now += gap
            for skew in skews[:count]:
                if owner == "direct":
                    world.direct(1)
                    continue
                if owner == "design":
                    if upstream.now == second:
                        upstream.now += 1
                    second = upstream.now
                key = DESIGN_KEY if owner == "design" else RESEARCH_KEY
                made = world.upload(key, skew=skew)
                if owner == "design":
                    mine.add(made)
        assert world.listed(limit=limit, order=order) == upstream_order(world, mine, order)


def test_a_batchs_output_file_read_long_after_it_was_made_is_jumped_to_in_its_place(
    tmp_path: Path, short_pages: None
) -> None:
    """OpenAI makes a batch's output file while the batch finalizes, five minutes before it
    completed here, and the team reads its batch an hour later: the file is recorded at
    OpenAI's `created_at` of it, read once, not when Tollgate saw it (the team's read, or
    the follower's settlement at `completed_at` if it came first), which listings jumping
    past other teams' files, newest or oldest first, would look past."""
    write_config(tmp_path, "http://simulated/v1", teams=TEAMS)
    upstream = BatchUpstream()
    app = in_process(tmp_path, upstream.app(), clock=lambda: upstream.clock[0])
    line = {"model": "gpt-image-2", "prompt": "a", "quality": "low", "size": "1024x1024"}
    body = json.dumps(
        {"custom_id": "c", "method": "POST", "url": "/v1/images/generations", "body": line}
    ).encode()
    with TestClient(app) as http:
        world = World(upstream, upstream.clock, http)
        sdk = world.sdk()
        made = sdk.files.create(file=("in.jsonl", io.BytesIO(body)), purpose="batch")
        batch = sdk.batches.create(
            input_file_id=made.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        upstream.now += 50
        world.direct(7)
        upstream.now += 50  # the batch finalizes: its output file is made
        output = upstream.make("batch_output")["id"]
        [found] = [b for b in upstream.batches if b["id"] == batch.id]
        found.update(
            status="completed", output_file_id=output, finalizing_at=upstream.now,
            completed_at=upstream.now + 300,
        )  # fmt: skip
        upstream.now += 1
        world.direct(7)
        later = []  # more than a jump reads at once, each in a second of its own
        for _ in range(files_module.JUMP_AT_ONCE):
            upstream.now += 20
            later.append(world.upload())
        upstream.clock[0] = upstream.now + 3600.0  # the team reads its batch an hour later
        reads = upstream.reads
        assert sdk.batches.retrieve(batch.id).output_file_id == output
        assert upstream.reads - reads <= 1  # its `created_at`, unless the follower read it
        reads = upstream.reads
        assert sdk.batches.retrieve(batch.id).output_file_id == output
        assert upstream.reads == reads  # on record: nothing read again
        assert world.listed(limit=1) == [*reversed(later), output, made.id]
        assert world.listed(limit=1, order="asc") == [made.id, output, *later]
