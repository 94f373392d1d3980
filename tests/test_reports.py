"""The pure parts of reports and reconciliation: periods, buckets, folding, line items."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from starlette.datastructures import QueryParams

from proxy.config.prices import load_price_book
from proxy.core.errors import InvalidRequest, UpstreamUnavailable
from proxy.core.settings import UpstreamSettings
from proxy.finance import projects, reconcile, reports
from proxy.finance.costs_api import fetch_costs, load_costs_file
from proxy.finance.parts import is_mainline, split
from proxy.finance.reconcile import (
    OpenAICosts,
    compare,
    held_by_model,
    holding_days,
    line_item_model,
    parse_costs,
    parse_day,
)
from proxy.finance.reconcile import as_json as reconcile_json
from proxy.finance.reconcile import as_table as reconcile_table
from proxy.finance.reports import CsvWriter, Period, as_csv, as_json, fold, parse_by
from proxy.ledger.base import Aggregate, Flagged, Holding
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.simulator.costs import costs_page
from tests.conftest import serving
from tests.test_reports_responses import WORKLOAD
from tests.test_statement import config as statement_config


@pytest.mark.parametrize(
    ("tz", "seconds"),
    [("UTC", 86_400), ("America/New_York", 3_600), ("Asia/Kolkata", 1_800),
     ("Asia/Kathmandu", 900)],
)  # fmt: skip
def test_bucket_width_puts_every_local_midnight_on_an_edge(tz: str, seconds: int) -> None:
    period = Period(date(2026, 3, 1), date(2026, 3, 31), tz)  # spans a DST change in New York
    assert period.bucket_seconds() == seconds
    assert all(int(m) % seconds == 0 for m in period.midnights())


def test_fold_turns_utc_buckets_into_local_days() -> None:
    period = Period(date(2026, 11, 1), date(2026, 11, 2), "Asia/Kolkata")
    width = period.bucket_seconds()
    first = int(period.start) // width
    found = fold(
        [Aggregate(("design", first), 1, 1, 0, 0, 10, 5),
         Aggregate(("design", first + 47), 2, 2, 0, 0, 20, 7),   # 23:30 local, still Nov 1
         Aggregate(("design", first + 48), 1, 1, 0, 0, 30, 11)],  # midnight: Nov 2
        ("team", "day"),
        period,
    )  # fmt: skip
    assert [(k, s.cost_nanos) for k, s in found.rows] == [
        (("design", "2026-11-01"), 12),
        (("design", "2026-11-02"), 11),
    ]
    assert as_json(found)["total"]["requests"] == 4


def test_rows_are_in_one_order_whatever_order_the_ledger_answers_in() -> None:
    """A request without a `user` and one whose `user` is "" are two groups: SQLite and
    PostgreSQL answer them in different orders, and a copied ledger's report is the same."""
    period = Period(date(2026, 11, 1), date(2026, 11, 30), "UTC")
    groups = [Aggregate((None, "gpt-image-2"), 1, 1, 0, 0, 10, 100),
              Aggregate(("", "gpt-image-2"), 2, 2, 0, 0, 20, 200),
              Aggregate(("", "gpt-image-1"), 3, 3, 0, 0, 30, 300)]  # fmt: skip
    by = parse_by("user,model")
    first = as_json(fold(groups, by, period))
    assert as_json(fold(groups[::-1], by, period)) == first
    assert [(r["user"], r["model"]) for r in first["rows"]] == [
        (None, "gpt-image-2"),
        ("", "gpt-image-1"),
        ("", "gpt-image-2"),
    ]


def test_money_is_a_decimal_string_never_a_float() -> None:
    report = fold([Aggregate(("m",), 1, 1, 0, 0, 0, 123_456_789_012)], ("model",),
                  Period(date(2026, 1, 1), date(2026, 1, 1), "UTC"))  # fmt: skip
    assert as_json(report)["rows"][0]["cost_usd"] == "123.456789012"
    assert as_csv(report).splitlines()[1] == "m,1,1,0,0,0,123.456789012"


def test_unknown_dimension_names_the_valid_ones() -> None:
    assert parse_by("team, model") == ("team", "model")
    assert parse_by("") == parse_by(None) == ()
    with pytest.raises(InvalidRequest, match="cost_center"):
        parse_by("colour")


@pytest.mark.parametrize(
    ("by", "said"),
    [
        (",,,", "empty field"),
        ("team,", "empty field"),
        ("team, ,model", "empty field"),
        ("team,team", "'team' twice"),
        ("team, model,team", "'team' twice"),
    ],
)
def test_an_empty_or_repeated_dimension_is_refused(by: str, said: str) -> None:
    with pytest.raises(InvalidRequest, match=said) as caught:
        parse_by(by)
    assert caught.value.param == "by"


@pytest.mark.parametrize(
    ("item", "model"),
    [("gpt-image-2, image output", "gpt-image-2"),
     ("batch api | gpt-image-2.5-sunburst image", "gpt-image-2.5-sunburst"),
     ("batch api | gpt-image-2.5-sunburst text", "gpt-image-2.5-sunburst"),
     ("dall-e-3, images", "dall-e-3"),
     ("gpt-6-astra, input_tokens", "gpt-6-astra"),
     ("gpt-5.5, cached input", "gpt-5.5"),
     ("gpt-5.5, output, long context", "gpt-5.5")],
)  # fmt: skip
def test_line_items_name_their_model(item: str, model: str) -> None:
    assert line_item_model(item) == model


def test_reconcile_flags_positive_differences_as_bypassed_traffic() -> None:
    day = date(2026, 11, 3)
    openai = OpenAICosts({(day, "gpt-image-2"): Decimal("1.50")}, {day})
    result = compare(openai, {(day, "gpt-image-2"): 1_000_000_000}, day, day)
    assert result.off_days == [day]
    assert result.lines[0].difference == Decimal("0.5")
    assert "bypassed" in result.lines[0].note
    assert compare(openai, {(day, "gpt-image-2"): 1_495_000_000}, day, day).off_days == []
    assert load_price_book().find("gpt-image-2-2026-04-21") is not None


def test_a_reconciliation_table_with_a_day_off_never_says_every_day_matches() -> None:
    """It said both: "1 day(s) off: …" and, below it, "Every day matches within the
    tolerance" (written whenever no day was off only by what Tollgate holds)."""
    day = date(2026, 11, 3)
    openai = OpenAICosts({(day, "gpt-image-2"): Decimal("1.50")}, {day})
    off = reconcile_table(compare(openai, {(day, "gpt-image-2"): 1_000_000_000}, day, day))
    assert "1 day(s) off: 2026-11-03" in off
    assert "Every day matches" not in off
    even = reconcile_table(compare(openai, {(day, "gpt-image-2"): 1_500_000_000}, day, day))
    assert "Every day matches within the tolerance." in even and "off:" not in even


def test_reconcile_lists_the_unresolved_flagged_requests_of_its_days() -> None:
    day = date(2026, 11, 3)
    openai = OpenAICosts({(day, "gpt-image-2"): Decimal("0.02")}, {day})
    lost = Flagged("tg_req_1", "design", 1_793_700_000.0, 19_600_000, 19_600_000,
                   "upstream_error", "outcome_unknown", None)  # fmt: skip
    resolved = replace(lost, id="tg_req_2", resolved_at=1_793_800_000.0, resolution="")
    result = replace(
        compare(openai, {(day, "gpt-image-2"): 39_200_000}, day, day), flagged=(lost, resolved)
    )
    assert [f.id for f in result.unresolved] == ["tg_req_1"]
    table = reconcile_table(result)
    assert "1 flagged request(s) of these days are charged their bound ($0.0196" in table
    assert "tollgate ledger resolve" in table
    assert reconcile_json(result)["unresolved_flagged"] == [
        {"id": "tg_req_1", "team": "design", "day": "2026-11-03", "charged_usd": "0.0196",
         "error_code": "outcome_unknown", "upstream_request_id": None}
    ]  # fmt: skip


def test_a_responses_group_splits_into_its_image_part_and_its_mainline_part() -> None:
    found = split(
        [Aggregate(("design", "gpt-image-2", "medium", "gpt-5.5", 7), 2, 2, 3100, 0, 8320, 900,
                   3000, 300),
         Aggregate(("design", "gpt-image-2", "medium", None, 7), 1, 1, 20, 0, 1056, 50)],
        ["team", "model", "quality"],
    )  # fmt: skip
    assert found == [
        Aggregate(("design", "gpt-image-2", "medium", 7), 2, 2, 100, 0, 8320, 600),
        Aggregate(("design", "gpt-5.5", None, 7), 0, 0, 3000, 0, 0, 300, 3000, 300),
        Aggregate(("design", "gpt-image-2", "medium", 7), 1, 1, 20, 0, 1056, 50),
    ]
    assert [is_mainline(a) for a in found] == [False, True, False]
    report = fold(found, ("team", "model", "quality", "day"), Period(date(1970, 1, 8),
                  date(1970, 1, 8), "UTC"))  # fmt: skip
    assert [(k[1], s.requests, s.cost_nanos) for k, s in report.rows] == [
        ("gpt-5.5", 0, 300), ("gpt-image-2", 3, 650)
    ]  # fmt: skip
    assert report.total.requests == 3 and report.total.cost_nanos == 950


def test_reconcile_names_mainline_models_and_their_snapshots_by_the_price_book() -> None:
    book = load_price_book()
    pages = [{"data": [{"start_time": 1_793_664_000, "results": [
        {"line_item": "gpt-4.1-2025-04-14, input", "amount": {"value": 0.5}},
        {"line_item": "gpt-4.1, output", "amount": {"value": 0.25}},
        {"line_item": "gpt-3.5-turbo, input", "amount": {"value": 0.125}},
    ]}]}]  # fmt: skip
    found = parse_costs(pages, book)
    assert found.amounts == {(date(2026, 11, 3), "gpt-4.1"): Decimal("0.75")}
    assert found.ignored == {(date(2026, 11, 3), "gpt-3.5-turbo, input"): Decimal("0.125")}


def test_only_the_line_items_left_out_on_the_reconciled_days_are_listed() -> None:
    """A month's export reconciled for one day lists that day's chat spend, not the
    month's."""
    day = 86_400
    pages = [{"data": [
        {"start_time": 1_793_664_000 + i * day, "results": [
            {"line_item": "gpt-3.5-turbo, input", "amount": {"value": 0.125}},
            {"line_item": "gpt-image-2, image output", "amount": {"value": 0.5}}]}
        for i in range(3)
    ]}]  # fmt: skip
    found = parse_costs(pages, load_price_book())
    second = date(2026, 11, 4)
    result = compare(found, {(second, "gpt-image-2"): 500_000_000}, second, second)
    assert dict(result.ignored) == {"gpt-3.5-turbo, input": Decimal("0.125")}
    assert reconcile_json(result)["ignored_line_items"] == {"gpt-3.5-turbo, input": "0.125"}
    assert result.off_days == []


@pytest.mark.parametrize(
    ("start", "end", "param"),
    [
        ("0001-01-01", "2026-01-01", "from"),  # its midnight in Tokyo is before year 1
        ("2026-01-01", "9999-12-31", "to"),  # the day after it is past year 9999
    ],
)
def test_a_period_past_what_a_report_can_read_is_a_request_error(
    start: str, end: str, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Period.parse(start, end, "Asia/Tokyo", 0).midnights()
    assert caught.value.param == param


@pytest.mark.parametrize(
    "text", ["20261201", "2026-W49", "2026-W49-1", "2026-336", "２０２６-12-01"]
)
def test_a_day_is_written_yyyy_mm_dd_only(text: str) -> None:
    """Python 3.11 reads `2026-W49` as its Monday: a report of one day, not of the week."""
    with pytest.raises(InvalidRequest) as caught:
        Period.parse(text, None, "UTC", 0)
    assert "use YYYY-MM-DD" in caught.value.message
    with pytest.raises(InvalidRequest):
        parse_day(text)
    assert Period.parse("2026-12-01", "2026-12-07", "UTC", 0).days()[-1] == date(2026, 12, 7)


@pytest.mark.parametrize("text", ["2026-1", "2026-011", "２０２６-１１", "2026-11-01", " 2026-11"])
def test_a_statement_month_is_written_yyyy_mm_only(text: str) -> None:
    """`--statement 2026-1` was read as January."""
    with pytest.raises(InvalidRequest, match="is not a month"):
        Period.month(text, "UTC")


def test_a_period_of_centuries_is_read() -> None:
    """A wide period, as "everything so far" is often asked, is read, not refused."""
    period = Period.parse("2000-01-01", "2999-12-31", "UTC", 0)
    assert (period.first, period.last) == (date(2000, 1, 1), date(2999, 12, 31))


def test_a_statement_of_year_9999_is_a_request_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        Period.month("9999-12", "UTC")
    assert caught.value.param == "statement"


def test_the_widest_period_reads_a_bounded_number_of_midnights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`/admin/report?from=1970-01-02&to=9998-12-31&by=day` read every one of 2.9 million
    midnights three times on the event loop: 23 s during which /healthz and every proxied
    request waited. A zone's offsets repeat yearly past 2100, so a year of them is enough."""
    period = Period.parse("1970-01-02", "9998-12-31", "America/New_York", 0)
    read = 0
    real = reports._midnight

    def counted(day: date, zone: ZoneInfo) -> float:
        nonlocal read
        read += 1
        return real(day, zone)

    monkeypatch.setattr(reports, "_midnight", counted)
    assert (period.start, period.end) == (104_400.0, 253_370_782_800.0)
    assert period.bucket_seconds() == 3_600
    assert read < 50_000


@pytest.mark.parametrize(
    "tz", ["America/New_York", "Asia/Kathmandu", "Pacific/Kiritimati", "Australia/Lord_Howe"]
)
def test_a_period_past_2100_has_the_width_of_all_its_midnights(tz: str) -> None:
    period = Period(date(2090, 1, 1), date(2260, 12, 31), tz)
    every = math.gcd(86_400, *(int(m) % 86_400 for m in period.midnights()))
    assert period.bucket_seconds() == every
    late = Period(date(2500, 3, 1), date(2700, 12, 31), tz)
    assert late.bucket_seconds() == math.gcd(86_400, *(int(m) % 86_400 for m in late.midnights()))


def test_the_widest_period_still_has_its_midnights() -> None:
    period = Period.parse("9998-12-01", "9998-12-31", "Pacific/Kiritimati", 0)
    assert len(period.midnights()) == 32
    assert len(Period.parse("1970-01-02", "1970-01-02", "America/Adak", 0).midnights()) == 2


def test_csv_rows_end_in_lf_and_a_cell_holding_a_line_break_stays_one_cell() -> None:
    out = io.StringIO()
    writer = CsvWriter(out)
    writer.writerow(["team", "cost_usd"])
    writer.writerow(["a\rb", "c\nd"])
    text = out.getvalue()
    assert text.startswith("team,cost_usd\n")
    assert list(csv.reader(io.StringIO(text, newline=""))) == [
        ["team", "cost_usd"],
        ["a\rb", "c\nd"],
    ]


@pytest.mark.parametrize(
    ("body", "says"),
    [(b"<html>", "not JSON"),
     (b'{"data": [{"start_time": 0, "results": [{"amount": {"value": 1, "currency": "eur"}}]}]}',
      "not in US dollars")],
    ids=["not-json", "euros"],
)  # fmt: skip
async def test_a_live_page_unlike_the_costs_apis_is_the_costs_api_unreachable(
    body: bytes, says: str
) -> None:
    """Refused as a saved file would be (exit 2), never read as a day that is off."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    day = date(2026, 11, 3)
    with pytest.raises(UpstreamUnavailable, match=says):
        await fetch_costs("http://costs.test/v1", "sk-admin", day, day, transport=transport)


def test_a_line_item_left_out_is_shown_with_its_control_characters_as_escapes() -> None:
    """The table is read in a terminal: a line item from an export cannot drive it."""
    day = date(2026, 11, 3)
    openai = OpenAICosts({}, {day}, {(day, "chat\x1b[2J, input\nforged"): Decimal("1")})
    table = reconcile_table(compare(openai, {}, day, day))
    assert "\x1b" not in table
    assert "Left out (not priced models): chat\\x1b[2J, input\\nforged" in table


def test_an_export_repeating_a_bucket_is_refused_naming_it() -> None:
    """Two overlapping exports put together: their common day would be summed twice."""
    bucket = {"start_time": 1_793_664_000, "end_time": 1_793_750_400, "results": [
        {"amount": {"value": 1.5, "currency": "usd"}, "line_item": "gpt-image-2, image output"}
    ]}  # fmt: skip
    other = {**bucket, "start_time": 1_793_750_400, "end_time": 1_793_836_800}
    assert load_costs_file(json.dumps([{"data": [bucket]}, {"data": [other]}]))
    with pytest.raises(InvalidRequest) as refused:
        load_costs_file(json.dumps([{"data": [bucket, other]}, {"data": [bucket]}]))
    assert refused.value.message == (
        "the costs file is not one Costs API answer: page 2 repeats the bucket of 2026-11-03 "
        "(start_time 1793664000), line item gpt-image-2, image output, of page 1: "
        "overlapping exports put together? Export each day once."
    )


async def test_live_pages_of_one_answer_never_repeat_a_bucket() -> None:
    """The simulated Costs API pages 40 days of spend in two pages: read as one answer."""
    billed = [r.billed for r in WORKLOAD if r.billed is not None]

    def answer(request: httpx.Request) -> httpx.Response:
        query = QueryParams(request.url.query.decode())
        return httpx.Response(200, json=costs_page(billed, query, now=2_000_000_000))

    first, last = date(2026, 10, 1), date(2026, 11, 9)
    transport = httpx.MockTransport(answer)
    pages = await fetch_costs("http://costs.test/v1", "sk-admin", first, last, transport=transport)
    assert len(pages) == 2
    spend = parse_costs(pages, load_price_book())
    assert len(spend.days) == 40 and spend.amounts


@pytest.mark.parametrize(
    "next_page",
    [lambda n: "same", lambda n: f"page_{n}", lambda n: None],
    ids=["the-same-cursor", "a-new-cursor-each-time", "no-cursor"],
)
async def test_live_pages_that_never_end_are_the_costs_api_unreachable(
    next_page: Callable[[int], str | None],
) -> None:
    """A Costs API that pages forever (the same cursor, a new one each time with no new
    day) or says it has more without a cursor is refused (exit 2): a reconciliation of the
    pages read would leave the other days' spend unseen, or never end."""
    asked: list[httpx.Request] = []
    day = date(2026, 11, 3)
    bucket = {"start_time": 1_793_664_000, "end_time": 1_793_750_400, "results": []}

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        assert len(asked) < 100, "the pages were read on and on"
        page = {"object": "page", "data": [bucket] if len(asked) == 1 else [],
                "has_more": True, "next_page": next_page(len(asked))}  # fmt: skip
        return httpx.Response(200, json=page)

    transport = httpx.MockTransport(answer)
    with pytest.raises(UpstreamUnavailable, match="pages that do not end"):
        await fetch_costs("http://costs.test/v1", "sk-admin", day, day, transport=transport)


async def test_a_live_error_answer_is_told_with_its_control_characters_as_escapes() -> None:
    """The message is printed to a terminal: an answer's text cannot drive it."""
    transport = httpx.MockTransport(lambda request: httpx.Response(401, content=b"\x1b[2Jno"))
    day = date(2026, 11, 3)
    with pytest.raises(UpstreamUnavailable) as refused:
        await fetch_costs("http://costs.test/v1", "sk-admin", day, day, transport=transport)
    assert "answered 401: \\x1b[2Jno (is the key an admin key" in refused.value.message
    assert "\x1b" not in refused.value.message


async def test_a_live_page_too_large_for_a_costs_answer_is_refused_unread() -> None:
    """A page of more than 64 MiB (here blanks before a page) is no Costs API answer: it is
    refused as it arrives, not held in memory whole and read."""
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(80):
            sent.append(1)
            yield b" " * 2**20
        yield b'{"object": "page", "data": [], "has_more": false}'

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    day = date(2026, 11, 3)
    transport = httpx.MockTransport(answer)
    with pytest.raises(UpstreamUnavailable, match="more than 67,108,864 bytes"):
        await fetch_costs("http://costs.test/v1", "sk-admin", day, day, transport=transport)
    assert len(sent) < 80


DECEMBER_FIRST = 1_796_126_400.0  # 2026-12-01 12:00 UTC


def test_a_report_to_a_day_alone_covers_that_days_month_up_to_it() -> None:
    """`report --to 2026-11-30` on December 1st: November, not a refusal that the day is
    before a `--from` that was never given."""
    period = Period.parse(None, "2026-11-30", "UTC", DECEMBER_FIRST)
    assert (period.first, period.last) == (date(2026, 11, 1), date(2026, 11, 30))
    period = Period.parse(None, "2026-12-03", "UTC", DECEMBER_FIRST)
    assert (period.first, period.last) == (date(2026, 12, 1), date(2026, 12, 3))


@pytest.mark.parametrize("by", ["model", "project"])
async def test_a_live_reconciliation_to_yesterday_runs_on_the_first_of_a_month(
    tmp_path: Path, by: str
) -> None:
    """The README's daily cron passes `--to` yesterday: on the 1st, yesterday is in the
    month before, which it compares (it was refused, exit 2, every 1st of the month)."""
    key = "sk-sim-finance-0001"
    with serving(create_simulator_app(SimulatorSettings(api_key=key))) as url:
        config = replace(
            statement_config(("design", "CC-1")), upstream=UpstreamSettings(base_url=url + "/v1")
        )
        ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
        run = reconcile.run if by == "model" else projects.run
        found = await run(
            config, ledger, [], key, None, date(2026, 11, 30), Decimal("0.01"), DECEMBER_FIRST
        )
    assert (found.first, found.last) == (date(2026, 11, 1), date(2026, 11, 30))
    assert found.off_days == []


def test_a_difference_no_more_than_what_is_held_is_not_called_bypassed() -> None:
    """A batch started on the 2nd, in flight: OpenAI may bill it on any day from then, so
    it is held beside each of them; a difference it cannot cover still bypassed Tollgate."""
    first, day = date(2026, 11, 1), date(2026, 11, 3)
    batch = Holding("design", "gpt-image-2", None, None, 1_793_620_800.0, 900_000_000, 0)
    response = Holding(
        "design", "gpt-image-2", "gpt-5.5", None, 1_793_664_000.0, 300_000_000, 100_000_000
    )
    held = holding_days([batch, response], first, day, held_by_model(load_price_book()))
    assert held == {(date(2026, 11, 2), "gpt-image-2"): 900_000_000,
                    (day, "gpt-image-2"): 1_100_000_000, (day, "gpt-5.5"): 100_000_000}  # fmt: skip
    openai = OpenAICosts({(day, "gpt-image-2"): Decimal("1.5"), (day, "gpt-5.5"): Decimal("1")},
                         {day})  # fmt: skip
    result = compare(openai, {(day, "gpt-image-2"): 400_000_000}, day, day, held=held)
    image, mainline = result.lines[1], result.lines[0]
    assert (image.status, image.held_usd, image.awaits_settlement) == ("off", Decimal("1.1"), True)
    assert image.note.startswith("Tollgate holds $1.1 in flight, not settled")
    assert (mainline.status, mainline.awaits_settlement) == ("off", False)
    assert "bypassed Tollgate" in mainline.note
    assert result.off_days == [day] and result.held_days == []
    assert reconcile_json(result)["lines"][1]["held_usd"] == "1.1"
    alone = compare(replace(openai, amounts={(day, "gpt-image-2"): Decimal("1.5")}),
                    {(day, "gpt-image-2"): 400_000_000}, day, day, held=held)  # fmt: skip
    assert alone.off_days == alone.held_days == [day]
    assert "off only by what Tollgate holds in flight" in reconcile_table(alone)


@pytest.mark.parametrize(
    ("days", "first", "last", "expected"),
    [
        ([3, 4, 5], 3, 5, []),
        ([3, 5], 3, 5, [(4, 4)]),
        ([4], 1, 9, [(1, 3), (5, 9)]),
        ([1, 2, 9, 10], 3, 8, [(3, 8)]),
        ([], 1, 2, [(1, 2)]),
    ],
)
def test_the_days_a_costs_export_leaves_out(
    days: list[int], first: int, last: int, expected: list[tuple[int, int]]
) -> None:
    from proxy.finance.reconcile import gaps

    def day(n: int) -> date:
        return date(2026, 11, n)

    found = gaps([day(d) for d in days], day(first), day(last))
    assert found == [(day(a), day(b)) for a, b in expected]
