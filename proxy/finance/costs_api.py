"""OpenAI's Costs API answers (`GET /v1/organization/costs`): read from a saved export or
fetched live, and refused, naming what is wrong, when they are not one whole answer.

    pages = load_costs_file(path.read_text())          # InvalidRequest: not an answer
    pages = await fetch_costs(base_url, admin_key, first, last)   # UpstreamUnavailable

An answer is pages of daily buckets (UTC days), each a list of results with an `amount`
in US dollars, grouped by line item and/or project. What is refused: a page that is not
one (no `data`, an error answer saved in its place), a saved answer of no bucket at all
(it covers no day), a saved answer whose last page says it has more, a bucket wider than
a day or across a UTC midnight, an amount that is not a
finite number below `MOST_USD` dollars or not in `usd`, a bucket repeated or overlapping
another of the same group (exports put together), and, live, pages that never end or a
page larger than `MOST_PAGE_BYTES`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeGuard

from proxy.core.errors import InvalidRequest, UpstreamUnavailable
from proxy.finance.reports import printable

if TYPE_CHECKING:
    import httpx

DAY = 86_400
PAGE_LIMIT = 31
MOST_PAGE_BYTES = 64 * 2**20
"""The largest page of the Costs API read: 31 days of some thousand line items each are a
few megabytes."""
LATEST = 253_370_764_800
"""9999-01-01 UTC: a bucket or a day after 9998 has no following midnight a datetime holds."""
MOST_USD = 10**15
"""An amount's bound: any sum of amounts below it prints to the micro-dollar in Decimal's
precision; an export holding more is not one."""


def utc_day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def midnight(day: date) -> int:
    return int(datetime.combine(day, datetime.min.time(), UTC).timestamp())


def load_costs_file(text: str) -> list[dict[str, Any]]:
    """A saved Costs API answer: one page object, a list of pages, or JSON lines of pages.
    InvalidRequest (naming what is wrong) when it is none of them."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"the costs file is not JSON: {exc}", param="costs") from exc
    pages = data if isinstance(data, list) else [data]
    if not pages:
        # Every answer of the Costs API is a page, even one without a day: an empty file (a
        # download that failed) covers no day, and every day of the ledger read as matching.
        raise InvalidRequest(
            "the costs file holds no page of a Costs API answer: is it empty? Save the "
            "answer of GET /v1/organization/costs, or fetch the costs live with "
            "--admin-key-env.",
            param="costs",
        )
    for number, page in enumerate(pages, 1):
        problem = page_problem(page)
        if problem:
            raise InvalidRequest(
                f"the costs file is not a Costs API answer: page {number}: {problem}",
                param="costs",
            )
    if not any(page["data"] for page in pages):
        # As an empty file: `"data": []` covers no day, and every day read as matching.
        raise InvalidRequest(
            "the costs file holds no daily bucket ('data' is empty in every page): it covers "
            "no day, so no day can be compared. The Costs API answers one bucket per day "
            "asked, even a day without spend: save its answer for the days to reconcile "
            "(start_time .. end_time), or fetch the costs live with --admin-key-env.",
            param="costs",
        )
    if pages and pages[-1].get("has_more") is True:
        # The rest of the answer was never saved: its days would go unreconciled, or, a day
        # split over pages, be compared with part of its amounts.
        raise InvalidRequest(
            f"the costs file is not a whole Costs API answer: its last page (page {len(pages)}) "
            "says it has more ('has_more': true): save every page, following 'next_page', or "
            "fetch the costs live with --admin-key-env.",
            param="costs",
        )
    problem = repeated_bucket(pages)
    if problem:
        raise InvalidRequest(
            f"the costs file is not one Costs API answer: {problem}", param="costs"
        )
    return pages


def page_problem(page: object) -> str:
    """What keeps `page` from being a page of `GET /v1/organization/costs` ('' if nothing):
    buckets of at most a day from 1970 to 9998, amounts in US dollars (the ledger's)."""
    if not isinstance(page, dict):
        return "not an object"
    if "data" not in page:  # an error answer saved in its place, `{"error": …}`
        return "no 'data' (saved: " + json.dumps(page)[:200] + ")"
    buckets = page.get("data", [])
    if not isinstance(buckets, list):
        return "'data' is not a list"
    for bucket in buckets:
        start = bucket.get("start_time") if isinstance(bucket, dict) else None
        if not _is_number(start):
            return "a bucket has no numeric 'start_time'"
        if not 0 <= start < LATEST:
            return f"a bucket starts at {start!r}, not a unix time from 1970 to 9998"
        end = bucket.get("end_time", start + DAY)
        if not _is_number(end) or not 0 < end - start <= DAY:
            return (
                f"a bucket spans {start!r} to {end!r}, not at most a day: export the costs "
                "with bucket_width=1d"
            )
        if end > midnight(utc_day(start)) + DAY:
            # Its amounts are of two UTC days, and would all be compared with the first's.
            return (
                f"a bucket spans {start!r} to {end!r}, across a UTC midnight: export the "
                "costs with a start_time at a UTC midnight"
            )
        results = bucket.get("results", [])
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            return "a bucket's 'results' is not a list of objects"
        for result in results:
            amount = result.get("amount", {})
            value = amount.get("value", 0) if isinstance(amount, dict) else None
            if not _is_amount(value):
                return f"an amount is not a number of US dollars: {amount!r}"
            currency = amount.get("currency", "usd")
            if not isinstance(currency, str) or currency.lower() != "usd":
                return f"an amount is not in US dollars, as the ledger is: {amount!r}"
    return ""


GROUP_KEYS = ("line_item", "project_id", "api_key_id", "user_id", "api_source")
"""The fields a Costs API result is grouped by: one bucket has one result per value."""


def repeated_bucket(pages: Iterable[Mapping[str, Any]]) -> str:
    """What repeats in `pages` ('' if nothing): a result of the same start time and
    group (line item, project, …) twice, or two of one group whose buckets overlap (one
    export from a midnight, one from an hour of that day), as two overlapping exports put
    together have, whose amounts would be summed twice. One answer's pages, live ones too,
    hold each span of time once."""
    seen: dict[tuple[Any, ...], int] = {}
    spans: dict[tuple[str, ...], list[tuple[float, float, int]]] = defaultdict(list)
    items: dict[tuple[str, ...], str] = {}
    for number, page in enumerate(pages, 1):
        for bucket in page.get("data", []):
            start = bucket["start_time"]
            end = bucket.get("end_time", start + DAY)
            for result in bucket.get("results", []):
                group = tuple(repr(result.get(name)) for name in GROUP_KEYS)
                spans[group].append((start, end, number))
                items[group] = str(result.get("line_item") or "(all line items)")
                key = (start, *group)
                if key in seen:
                    day = utc_day(start).isoformat()
                    item = printable(str(result.get("line_item") or "(all line items)"))
                    project = result.get("project_id")
                    of = f" of project {printable(str(project))}" if project else ""
                    return (
                        f"page {number} repeats the bucket of {day} (start_time {start!r}), "
                        f"line item {item}{of}, of page {seen[key]}: overlapping exports put "
                        "together? Export each day once."
                    )
                seen[key] = number
    for group, found in spans.items():
        found.sort()
        for (_, end, before), (start, _, number) in itertools.pairwise(found):
            if start < end:
                item = printable(items[group])
                return (
                    f"page {number} has a bucket from {start!r} that overlaps one of page "
                    f"{before} until {end!r} ({utc_day(start).isoformat()}), line item {item}: "
                    "overlapping exports put together? Export each day once."
                )
    return ""


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_amount(value: object) -> bool:
    """A number of dollars that sums and prints exactly: finite, below `MOST_USD`."""
    if _is_number(value):
        return abs(value) < MOST_USD
    if isinstance(value, str):
        try:
            return abs(Decimal(value)) < MOST_USD
        except ArithmeticError:
            return False
    return False


async def fetch_costs(
    base_url: str,
    admin_key: str,
    first: date,
    last: date,
    transport: httpx.AsyncBaseTransport | None = None,
    group_by: Sequence[str] = ("line_item",),
) -> list[dict[str, Any]]:
    """Every page of `GET /organization/costs` for the UTC days `first`..`last`, its
    results grouped by `group_by` (`line_item`, `project_id`). httpx is imported here:
    `ledger flagged` and a reconciliation of a saved file need none of it."""
    import httpx

    params: dict[str, Any] = {
        "start_time": midnight(first),
        "end_time": midnight(last + timedelta(days=1)),
        "bucket_width": "1d",
        "group_by[]": list(group_by),
        "limit": PAGE_LIMIT,
    }
    pages: list[dict[str, Any]] = []
    cursors: set[str] = set()
    days = (last - first).days + 1
    url = base_url.rstrip("/") + "/organization/costs"
    async with httpx.AsyncClient(
        headers={"authorization": f"Bearer {admin_key}"}, timeout=60, transport=transport
    ) as client:
        while True:
            try:
                status, body = await _read_page(client, url, params)
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(f"cannot reach {url}: {exc}") from exc
            if status != 200:
                text = printable(body[:300].decode(errors="replace"))
                raise UpstreamUnavailable(
                    f"{url} answered {status}: {text}"
                    " (is the key an admin key with access to usage and costs?)"
                )
            try:
                page: dict[str, Any] = json.loads(body)
            except ValueError as exc:
                raise UpstreamUnavailable(f"{url} answered something not JSON: {exc}") from exc
            problem = page_problem(page)
            if problem:
                raise UpstreamUnavailable(f"{url} answered a page unlike the Costs API: {problem}")
            pages.append(page)
            if not page.get("has_more"):
                problem = repeated_bucket(pages)
                if problem:
                    raise UpstreamUnavailable(f"{url} answered pages repeating a day: {problem}")
                return pages
            problem = next_page_problem(page.get("next_page"), cursors, len(pages), days)
            if problem:
                raise UpstreamUnavailable(f"{url} answered pages that do not end: {problem}")
            cursors.add(page["next_page"])
            params["page"] = page["next_page"]


async def _read_page(
    client: httpx.AsyncClient, url: str, params: Mapping[str, Any]
) -> tuple[int, bytes]:
    """The status and body of one page; UpstreamUnavailable past `MOST_PAGE_BYTES` (read no
    further: a page that size is no Costs API answer, and would be held in memory whole)."""
    async with client.stream("GET", url, params=params) as answer:
        body = bytearray()
        async for chunk in answer.aiter_bytes():
            body += chunk
            if len(body) > MOST_PAGE_BYTES:
                raise UpstreamUnavailable(
                    f"{url} answered a page of more than {MOST_PAGE_BYTES:,} bytes: a page "
                    f"of {PAGE_LIMIT} days of costs is far smaller"
                )
        return answer.status_code, bytes(body)


PAGES_A_DAY = 10
"""The most pages read per day asked for. An answer has a bucket a day and a page at least
one bucket; ten leaves room for one that splits a day's results over pages, and still ends
an answer that never does."""


def next_page_problem(cursor: object, seen: set[str], pages: int, days: int) -> str:
    """What keeps the Costs API's `next_page` from leading to the rest of its answer of
    `days` days ('' if nothing), after `pages` pages: no cursor, one given before (a loop),
    or `PAGES_A_DAY` pages a day already. The pages read so far are not the whole answer:
    the days of the rest would go unreconciled, spend that bypassed Tollgate on them
    unseen."""
    if not isinstance(cursor, str) or not cursor:
        return f"page {pages} has more ('has_more') but no 'next_page' to read it with"
    if cursor in seen:
        return f"page {pages} names the 'next_page' {printable(cursor)[:100]} a second time"
    if pages >= PAGES_A_DAY * days:
        return f"{pages} pages and more for {days} day(s)"
    return ""
