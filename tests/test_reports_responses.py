"""Finance over the Responses API door, on both ledger backends: reconciliation against the
simulated Costs API's export, reports by model that split a request between its mainline and
image models, the statement's endpoint and mainline lines, and the audit export's columns."""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.datastructures import QueryParams

from proxy.config.prices import load_price_book
from proxy.core.models import NANOS_PER_USD, Entry, Settlement, Usage
from proxy.core.settings import Allow, Budget, Config, Team, UpstreamSettings
from proxy.doors.responses import read_body
from proxy.finance import reconcile, reports, statement
from proxy.finance.reports import Period
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend
from proxy.metrics import Metrics
from proxy.simulator import billing
from proxy.simulator.costs import costs_page
from tests import pg
from tests.test_ledger import ledger_url

BOOK = load_price_book()
DAY_ONE = datetime(2026, 11, 3, 9, tzinfo=UTC).timestamp()
DAY_TWO = DAY_ONE + 86_400
FIRST, LAST = date(2026, 11, 3), date(2026, 11, 4)
NOVEMBER = Period(date(2026, 11, 1), date(2026, 11, 30), "UTC")


@dataclass(frozen=True)
class Request:
    """One request as both sides saw it: Tollgate's row and OpenAI's billing record."""

    entry: Entry
    settlement: Settlement
    billed: billing.Entry | None


def request(
    number: int,
    at: float,
    team: str,
    endpoint: str,
    model: str,
    quality: str,
    usage: Usage,
    mainline: tuple[str, str] | None = None,
) -> Request:
    """A settled request priced from the book; `mainline`: (the name in Tollgate's row, the
    name OpenAI bills under) of a Responses request's mainline model."""
    image = BOOK.find(model)
    assert image is not None
    mainline_nanos = 0
    if mainline is not None:
        text = BOOK.find_mainline(mainline[0])
        assert text is not None
        mainline_nanos = text.cost(usage)
    image_usage = replace(usage, mainline_input=0, mainline_cached_input=0, mainline_output=0)
    cost = image.cost(image_usage) + mainline_nanos
    entry = Entry(
        id=f"tg_req_{number}", started_at=at, endpoint=endpoint, team=team,  # type: ignore[arg-type]
        cost_center=CENTERS[team], key_id=f"{team}-key", user="alice", model_requested=model,
        model=model, quality_requested=quality, quality=quality, size_requested="1024x1024",
        size="1024x1024", n_requested=1, n=1, estimated_nanos=cost * 2,
        mainline_model=mainline[0] if mainline else None,
    )  # fmt: skip
    settlement = Settlement(
        finished_at=at + 20, outcome="ok", status=200, usage=usage, cost_nanos=cost,
        upstream_request_id=f"req_{number}", mainline_cost_nanos=mainline_nanos,
    )  # fmt: skip
    billed = billing.Entry(
        id=f"req_{number}", time=at + 20, endpoint=endpoint,  # type: ignore[arg-type]
        model=model, quality=quality, size="1024x1024", n=1, stream=False, status=200,
        billed=True, usage=billing.BilledUsage(usage.text_input, usage.image_input,
                                               usage.image_output),
        images=usage.images, authorization=None,
        mainline_model=mainline[1] if mainline else None,
        mainline=billing.MainlineUsage(
            usage.mainline_input + usage.mainline_cached_input, usage.mainline_cached_input,
            usage.mainline_output,
        ) if mainline else None,
    )  # fmt: skip
    return Request(entry, settlement, billed)


CENTERS = {"design": "CC-1042", "research": "CC-2077"}
RESPONSE_USAGE = Usage(
    text_input=120, image_output=4160, images=1,
    mainline_input=1_564, mainline_cached_input=256, mainline_output=210,
)  # fmt: skip
WORKLOAD = (
    request(1, DAY_ONE, "design", "generations", "gpt-image-2", "low",
            Usage(text_input=20, image_output=1056, images=1)),
    request(2, DAY_ONE + 60, "design", "responses", "gpt-image-2", "medium", RESPONSE_USAGE,
            ("gpt-5.5", "gpt-5.5")),
    # A snapshot in Tollgate's row; OpenAI bills it under its model's name.
    request(3, DAY_TWO, "research", "responses", "gpt-image-1.5", "low",
            replace(RESPONSE_USAGE, image_output=272, mainline_output=1_024),
            ("gpt-4.1-2025-04-14", "gpt-4.1")),
    request(4, DAY_TWO + 60, "design", "responses", "gpt-image-2", "low",
            replace(RESPONSE_USAGE, mainline_cached_input=0), ("gpt-5.5", "gpt-5.5")),
)  # fmt: skip
REJECTED = Request(
    Entry(id="tg_req_5", started_at=DAY_TWO + 120, endpoint="responses", team="research",
          cost_center="CC-2077", model_requested="gpt-image-2", mainline_model="gpt-5.5"),
    Settlement(finished_at=DAY_TWO + 120, outcome="rejected_budget", status=429),
    None,
)  # fmt: skip
REQUESTS = (*WORKLOAD, REJECTED)


def mainline_of(r: Request) -> int:
    return r.settlement.mainline_cost_nanos


def by_model() -> dict[str, int]:
    """What each (canonical) model billed, from the requests themselves."""
    found: dict[str, int] = defaultdict(int)
    for r in WORKLOAD:
        found[str(r.entry.model)] += r.settlement.cost_nanos - mainline_of(r)
        if r.entry.mainline_model:
            found[str(reconcile.canonical(r.entry.mainline_model, BOOK))] += mainline_of(r)
    return dict(found)


async def filled(url: str, requests: tuple[Request, ...] = REQUESTS) -> Backend:
    ledger = await open_ledger(url)
    for r in requests:
        await ledger.record(r.entry, r.settlement)
    return ledger


@pytest.fixture
async def ledger(url: str) -> AsyncIterator[Backend]:
    opened = await filled(url)
    yield opened
    await opened.close()


def costs_export(requests: tuple[Request, ...] = WORKLOAD) -> list[dict[str, Any]]:
    """OpenAI's Costs API answer for these requests' days, by the simulator's pricing."""
    start = int(datetime(2026, 11, 3, tzinfo=UTC).timestamp())
    query = QueryParams(
        {"start_time": start, "end_time": start + 2 * 86_400, "group_by[]": "line_item"}
    )
    billed = [r.billed for r in requests if r.billed is not None]
    page = costs_page(billed, query, now=start + 3 * 86_400)
    # Chat spend of a model in neither section of the price book: left out, counted.
    page["data"][0]["results"].append(
        {"object": "organization.costs.result", "amount": {"value": 0.25, "currency": "usd"},
         "line_item": "gpt-3.5-turbo, input", "project_id": None}
    )  # fmt: skip
    return [page]


async def test_reconcile_matches_the_costs_api_exactly_per_day_and_model(
    ledger: Backend,
) -> None:
    openai = reconcile.parse_costs(costs_export(), BOOK)
    ours = await reconcile.ledger_costs(ledger, FIRST, LAST, BOOK)
    result = reconcile.compare(openai, ours, FIRST, LAST, tolerance=Decimal(0))
    assert [(line.day, line.model) for line in result.lines] == [
        (FIRST, "gpt-5.5"), (FIRST, "gpt-image-2"),
        (LAST, "gpt-4.1"), (LAST, "gpt-5.5"), (LAST, "gpt-image-1.5"), (LAST, "gpt-image-2"),
    ]  # fmt: skip
    assert all(line.difference == 0 and line.status == "ok" for line in result.lines), [
        (line.model, line.difference) for line in result.lines
    ]
    assert sum(ours.values()) == sum(r.settlement.cost_nanos for r in WORKLOAD)
    assert result.ignored == {"gpt-3.5-turbo, input": Decimal("0.25")}
    # The table lists them with their amounts too, as the JSON does.
    assert "Left out (not priced models): gpt-3.5-turbo, input $0.25\n" in reconcile.as_table(
        result
    )


async def test_a_mainline_part_missing_from_the_ledger_shows_as_a_difference(
    tmp_path: Path,
) -> None:
    second = WORKLOAD[1]
    lost = replace(
        second,
        settlement=replace(
            second.settlement,
            cost_nanos=second.settlement.cost_nanos - mainline_of(second),
            mainline_cost_nanos=0,
        ),
    )
    ledger = await filled(ledger_url("sqlite", tmp_path), (WORKLOAD[0], lost, *WORKLOAD[2:]))
    try:
        ours = await reconcile.ledger_costs(ledger, FIRST, LAST, BOOK)
    finally:
        await ledger.close()
    result = reconcile.compare(reconcile.parse_costs(costs_export(), BOOK), ours, FIRST, LAST)
    off = [line for line in result.lines if line.status == "off"]
    assert [(line.day, line.model) for line in off] == [(FIRST, "gpt-5.5")]
    assert off[0].difference == Decimal(mainline_of(second)) / NANOS_PER_USD
    assert "bypassed" in off[0].note


async def test_a_model_the_price_book_no_longer_prices_is_still_reconciled(url: str) -> None:
    """gpt-image-1.5 dropped from a custom price book after the month it was used in: its
    line items are compared with its spend in the ledger, not left out while that spend
    reads as billed by no one (`Tollgate recorded more than OpenAI billed`)."""
    book = replace(BOOK, models={k: m for k, m in BOOK.models.items() if m.name != "gpt-image-1.5"})
    cfg = replace(config(), prices=book)
    ledger = await filled(url)
    await ledger.close()
    found = await reconcile.run(cfg, url, costs_export(), None, None, None, Decimal(0), 0.0)
    assert found.off_days == []
    assert (LAST, "gpt-image-1.5") in {(line.day, line.model) for line in found.lines}
    assert found.ignored == {"gpt-3.5-turbo, input": Decimal("0.25")}


async def report(ledger: Backend, by: str) -> dict[str, Any]:
    return reports.as_json(await reports.summarize(ledger, NOVEMBER, reports.parse_by(by)))


async def test_spend_by_model_is_what_each_model_billed_and_agrees_with_reconcile(
    ledger: Backend,
) -> None:
    rows = (await report(ledger, "model"))["rows"]
    spent: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        spent[str(reconcile.canonical(row["model"], BOOK))] += Decimal(row["cost_usd"])
    assert spent == {m: Decimal(n) / NANOS_PER_USD for m, n in by_model().items()}
    reconciled: dict[str, int] = defaultdict(int)
    for (_, model), nanos in (await reconcile.ledger_costs(ledger, FIRST, LAST, BOOK)).items():
        reconciled[model] += nanos
    assert {m: Decimal(n) / NANOS_PER_USD for m, n in reconciled.items()} == spent
    # Each request is counted once, under its image model; the mainline rows hold its
    # mainline model's input tokens and dollars.
    counted = {row["model"]: (row["requests"], row["images"]) for row in rows}
    assert counted == {
        "gpt-image-2": (4, 3), "gpt-image-1.5": (1, 1), "gpt-5.5": (0, 0),
        "gpt-4.1-2025-04-14": (0, 0),
    }  # fmt: skip
    mainline = next(row for row in rows if row["model"] == "gpt-5.5")
    assert mainline["text_input_tokens"] == 2 * 1_564 + 256
    assert mainline["image_output_tokens"] == 0


@pytest.mark.parametrize(
    "by", ["", "team", "model", "team,model,quality", "endpoint", "size,day", "outcome,month"]
)
async def test_the_total_is_every_rows_cost_and_each_request_once_however_grouped(
    ledger: Backend, by: str
) -> None:
    found = await report(ledger, by)
    total = found["total"]
    assert total["requests"] == len(REQUESTS)
    assert (
        Decimal(total["cost_usd"])
        == Decimal(sum(r.settlement.cost_nanos for r in REQUESTS)) / NANOS_PER_USD
    )
    assert total["text_input_tokens"] == sum(
        r.settlement.usage.text_input + r.settlement.usage.mainline_input
        + r.settlement.usage.mainline_cached_input for r in REQUESTS
    )  # fmt: skip
    assert sum(Decimal(row["cost_usd"]) for row in found["rows"]) == Decimal(total["cost_usd"])
    assert sum(row["requests"] for row in found["rows"]) == len(REQUESTS)


async def test_by_endpoint_has_a_responses_row_and_mainline_rows_have_no_quality(
    ledger: Backend,
) -> None:
    doors = {r["endpoint"]: r for r in (await report(ledger, "endpoint"))["rows"]}
    assert set(doors) == {"generations", "responses"}
    assert doors["responses"]["requests"] == 4
    responses = sum(r.settlement.cost_nanos for r in WORKLOAD if r.entry.endpoint == "responses")
    assert Decimal(doors["responses"]["cost_usd"]) == Decimal(responses) / NANOS_PER_USD
    rows = (await report(ledger, "team,model,quality,endpoint"))["rows"]
    keys = {(r["team"], r["model"], r["quality"], r["endpoint"]): r["requests"] for r in rows}
    assert keys[("design", "gpt-5.5", None, "responses")] == 0
    assert keys[("research", "gpt-4.1-2025-04-14", None, "responses")] == 0
    assert keys[("design", "gpt-image-2", "medium", "responses")] == 1


async def test_spend_by_model_agrees_with_the_cost_metric(ledger: Backend) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for r in REQUESTS:
        metrics.started()
        metrics.finished(r.entry, r.settlement, [])
    counted: dict[str, Decimal] = defaultdict(Decimal)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "tollgate_cost_usd_total":
                counted[sample.labels["model"]] += Decimal(repr(sample.value))
    rows = (await report(ledger, "model"))["rows"]
    spent = {r["model"]: Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] != "0"}
    assert set(counted) == set(spent)
    for model, usd in spent.items():
        assert abs(counted[model] - usd) < Decimal("1e-9"), model


def config() -> Config:
    teams = tuple(
        Team(name, center, (), (Budget("month", "usd", 50 * NANOS_PER_USD),), (), Allow(), ())
        for name, center in CENTERS.items()
    )
    return Config(
        root=Path("."), upstream=UpstreamSettings(), ledger_url="", timezone="UTC",
        admin_token=None, prices=BOOK, teams=teams,
    )  # fmt: skip


async def test_the_statement_shows_each_teams_doors_and_mainline_model_part(
    ledger: Backend,
) -> None:
    built = await statement.build(ledger, config(), NOVEMBER)
    data = statement.as_json(built)
    teams = {t["team"]: t for c in data["cost_centers"] for t in c["teams"]}
    design = teams["design"]
    doors = {d["endpoint"]: Decimal(d["cost_usd"]) for d in design["by_endpoint"]}
    design_rows = [r for r in WORKLOAD if r.entry.team == "design"]
    assert doors == {
        door: Decimal(sum(r.settlement.cost_nanos for r in design_rows
                          if r.entry.endpoint == door)) / NANOS_PER_USD
        for door in ("generations", "responses")
    }  # fmt: skip
    parts = {(m["model"], m["quality"], m["part"]): m for m in design["by_model"]}
    mainline = parts["gpt-5.5", None, "mainline"]
    assert mainline["requests"] == 0
    assert (
        Decimal(mainline["cost_usd"])
        == Decimal(sum(mainline_of(r) for r in design_rows)) / NANOS_PER_USD
    )
    assert parts["gpt-image-2", "medium", "image"]["requests"] == 1
    for team in teams.values():
        assert sum(Decimal(m["cost_usd"]) for m in team["by_model"]) == Decimal(
            team["total"]["cost_usd"]
        )
        assert sum(Decimal(d["cost_usd"]) for d in team["by_endpoint"]) == Decimal(
            team["total"]["cost_usd"]
        )
    research = teams["research"]
    assert [m["model"] for m in research["by_model"] if m["part"] == "mainline"] == [
        "gpt-4.1-2025-04-14"
    ]
    lines = statement.as_csv(built).splitlines()
    assert "CC-1042,design,mainline_model,gpt-5.5,cost_usd," + mainline["cost_usd"] in lines
    assert any(line.startswith("CC-1042,design,endpoint,responses,requests,") for line in lines)
    page = statement.as_html(built)
    assert "<i>mainline</i>" in page and "<td>responses</td>" in page
    assert "gpt-5.5 (mainline)" in statement.render(built, "table")


async def test_the_audit_export_carries_the_mainline_columns(ledger: Backend) -> None:
    chunks = [c async for c in reports.audit(ledger, NOVEMBER, "jsonl")]
    rows = {r["id"]: r for r in map(json.loads, chunks)}
    second = rows["tg_req_2"]
    assert second["endpoint"] == "responses"
    assert second["mainline_model"] == "gpt-5.5"
    assert (
        second["mainline_input_tokens"],
        second["mainline_cached_input_tokens"],
        second["mainline_output_tokens"],
    ) == (1_564, 256, 210)
    assert second["mainline_cost_nanos"] == mainline_of(WORKLOAD[1])
    assert rows["tg_req_1"]["mainline_model"] is None


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_the_audit_export_leaves_out_the_ledgers_own_clock(ledger: Backend, fmt: str) -> None:
    """`reserved_clock` (seconds since boot on SQLite) ages reservations; it is no time a
    reader of the export could use, and differs between the two ledgers."""
    text = "".join([c async for c in reports.audit(ledger, NOVEMBER, fmt)])
    assert "started_utc" in text
    assert "reserved_clock" not in text


@pytest.mark.parametrize("excel", [False, True])
async def test_the_audit_csv_of_a_period_without_rows_is_its_header(
    ledger: Backend, excel: bool
) -> None:
    """A period with no rows used to export nothing at all: no header for a script that
    reads the columns by name, and no byte-order mark with `excel`."""
    filled = "".join([c async for c in reports.audit(ledger, NOVEMBER, "csv", excel)])
    empty = Period(date(2025, 1, 1), date(2025, 1, 31), "UTC")
    text = "".join([c async for c in reports.audit(ledger, empty, "csv", excel)])
    bom = "\ufeff" if excel else ""
    assert text == filled.split("\n", 1)[0] + "\n"
    assert text.startswith(bom + "id,upstream_request_id,started_at,")
    assert text.rstrip().endswith(",cost_usd,estimated_usd")


async def test_reports_and_statements_are_identical_on_sqlite_and_postgresql(
    tmp_path: Path,
) -> None:
    schema = pg.migrated_schema()
    answers = []
    try:
        for url in (ledger_url("sqlite", tmp_path), schema):
            ledger = await filled(url)
            try:
                found: dict[str, Any] = {
                    by: await report(ledger, by)
                    for by in ("model", "team,model,quality,size,endpoint,day", "endpoint")
                }
                built = await statement.build(ledger, config(), NOVEMBER)
                found["statement"] = statement.as_json(built)
                found["reconcile"] = await reconcile.ledger_costs(ledger, FIRST, LAST, BOOK)
                async with contextlib.aclosing(ledger.export(0, DAY_TWO * 2)) as rows:
                    found["export"] = [
                        {k: row[k] for k in row if k.startswith("mainline_")} async for row in rows
                    ]
                answers.append(found)
            finally:
                await ledger.close()
    finally:
        pg.drop_schema(schema)
    sqlite, postgres = answers
    assert sqlite["model"]["rows"] and sqlite == postgres


def made_no_image(number: int, at: float, fields: dict[str, Any]) -> Request:
    """A Responses request that made no image, recorded as the door records it: read from
    its body (`fields`), asked, sent, and settled at its mainline model's cost alone."""
    team = config().teams[0]
    body = {"model": "gpt-5.5", "input": "A haiku", "max_output_tokens": 300, **fields}
    request = read_body(body, 100, "gpt-image-2", team).request
    usage = Usage(mainline_input=900, mainline_cached_input=100, mainline_output=250)
    text = BOOK.find_mainline("gpt-5.5")
    assert text is not None
    cost = text.cost(usage)
    entry = (
        Entry(f"tg_req_{number}", at, "responses")
        .identified(team.name, CENTERS[team.name], f"{team.name}-key")
        .asked(request)
        .sent(request, cost * 2, "")
    )
    settled = Settlement(
        finished_at=at + 5, outcome="ok", status=200, usage=usage, cost_nanos=cost,
        mainline_cost_nanos=cost,
    )  # fmt: skip
    return Request(entry, settled, None)


TOOL_NONE = {"type": "image_generation", "model": "gpt-image-1.5", "quality": "low"}
MADE_NO_IMAGE = (
    made_no_image(11, DAY_ONE + 300, {}),
    made_no_image(12, DAY_TWO + 300, {"tools": [TOOL_NONE], "tool_choice": "none"}),
)


async def test_a_response_that_made_no_image_counts_under_its_mainline_model_alone(
    url: str,
) -> None:
    """Without the image tool, or with `tool_choice: none`, a response runs its mainline
    model alone: by model it is a request of that model, never of an image model (it was
    recorded under the default image model, gpt-image-2: "2 requests, 0 images"), in the
    report, the statement, reconcile and the metrics alike."""
    ledger = await filled(url, (WORKLOAD[0], WORKLOAD[1], *MADE_NO_IMAGE))
    try:
        spent = sum(r.settlement.cost_nanos for r in MADE_NO_IMAGE)
        rows = (await report(ledger, "model"))["rows"]
        counted = {r["model"]: (r["requests"], r["images"]) for r in rows}
        assert counted == {"gpt-image-2": (2, 2), "gpt-5.5": (2, 0)}
        [five] = [r for r in rows if r["model"] == "gpt-5.5"]
        assert Decimal(five["cost_usd"]) * NANOS_PER_USD == spent + mainline_of(WORKLOAD[1])
        by_quality = (await report(ledger, "model,quality,size"))["rows"]
        assert {(r["model"], r["quality"], r["size"]) for r in by_quality} == {
            ("gpt-image-2", "low", "1024x1024"), ("gpt-image-2", "medium", "1024x1024"),
            ("gpt-5.5", None, None),
        }  # fmt: skip
        ours = await reconcile.ledger_costs(ledger, FIRST, LAST, BOOK)
        assert {m for _, m in ours} == {"gpt-image-2", "gpt-5.5"}
        built = statement.as_json(await statement.build(ledger, config(), NOVEMBER))
        [design] = [t for c in built["cost_centers"] for t in c["teams"] if t["team"] == "design"]
        lines = {(m["model"], m["quality"], m["part"]): m["requests"] for m in design["by_model"]}
        assert lines == {
            ("gpt-image-2", "low", "image"): 1, ("gpt-image-2", "medium", "image"): 1,
            ("gpt-5.5", None, "mainline"): 2,
        }  # fmt: skip
    finally:
        await ledger.close()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for r in MADE_NO_IMAGE:
        metrics.started()
        metrics.finished(r.entry, r.settlement, [])
    labels = {"team": "design", "endpoint": "responses", "outcome": "ok"}
    assert registry.get_sample_value("tollgate_requests_total", {**labels, "model": "gpt-5.5"}) == 2
    assert (
        registry.get_sample_value("tollgate_requests_total", {**labels, "model": "gpt-image-2"})
        is None
    )
