"""The bound against the simulator's bill, in process: what Tollgate reserves for the exact
bytes it forwards (each downgrade it may send included), and what the simulated upstream
bills for those bytes, priced both at the simulator's own rates (`costs.line_costs`) and
at Tollgate's price book. Used by the generated tests `test_bound_fuzz_*.py`.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.requests import Request

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.budgets import variants
from proxy.core.errors import RequestError
from proxy.core.models import Endpoint, Usage
from proxy.core.pricing import ModelPrices, PriceBook
from proxy.core.settings import Config, Downgrade, Team
from proxy.doors import ImagesDoor, ResponsesDoor
from proxy.doors.base import Door
from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.costs import line_costs
from proxy.simulator.faults import pick_fault
from proxy.simulator.forms import RawRequest, parse_json, parse_multipart
from proxy.simulator.refusals import ApiError
from proxy.simulator.response_tokens import tokens_of
from proxy.simulator.responses import read_order
from proxy.simulator.tokens import Tokens, played_tokens
from proxy.simulator.validation import ImageOrder, validate
from tests.conftest import write_config

SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
DEEP = "bound-deep"
"""The profile of a run by hand with many more examples (registered in `conftest`):
`pytest --hypothesis-profile=bound-deep tests/test_bound_fuzz_*.py`."""
DEEP_SCALE = 40
FALLBACKS = (
    None, "gpt-image-1-mini", "gpt-image-1", "gpt-image-2", "gpt-image-1.5",
    "gpt-image-2.6-flare", "dall-e-2", "dall-e-3",
)  # fmt: skip
MAX_QUALITIES = (None, None, "low", "medium", "high", "xhigh", "standard")
POLICIES = st.tuples(st.sampled_from(FALLBACKS), st.sampled_from(MAX_QUALITIES))
"""(downgrade.fallback_model, allow.max_quality) of the team, for `team_with`."""


def examples(normal: int) -> settings:
    """`normal` examples in the suite (kept small: a few seconds a test); `DEEP_SCALE` times
    as many under the `bound-deep` profile."""
    deep = settings.get_current_profile_name() == DEEP
    return settings(
        max_examples=normal * (DEEP_SCALE if deep else 1),
        deadline=None,
        database=None,
        suppress_health_check=SUPPRESS,
    )


DEPLOYMENT_MAINLINE = """
mainline:
  gpt-5.6-sol:
    source: https://developers.openai.com/api/docs/pricing
    effective_from: 2026-07-09
    rates: {text_input: "5.00", cached_text_input: "0.50", text_output: "30.00",
            cache_write_input: "6.25"}
    reasoning_context: all_turns
"""
"""A deployment's book beside the built-in one: the simulator's mainline models that the
built-in book does not list (`BOOKLESS_MAINLINE`), one that bills its prompt-cache writes."""


def build_config(root: Path, upstream: str = "http://upstream.invalid/v1") -> Config:
    """The fuzz configuration, its price book the built-in one with `DEPLOYMENT_MAINLINE`;
    `upstream` a regional host (never reached) prices the book as that endpoint bills it,
    and the oracle's bill at Tollgate's rates is then the regional bill (the simulator's own
    is computed as the global endpoint's, below it)."""
    (root / "prices.yaml").write_text(DEPLOYMENT_MAINLINE)
    write_config(
        root,
        upstream,
        "prices: prices.yaml\n",
        teams={"fuzz": f"name: fuzz\nkeys:\n  - {{id: a, sha256: {key_hash('tg_fuzz')}}}\n"},
    )
    return load_config(root)


def team_with(config: Config, fallback: str | None, max_quality: str | None = None) -> Team:
    """The one team, with a fallback model for budget downgrades and `allow.max_quality`."""
    (team,) = config.teams
    allow = replace(team.allow, max_quality=max_quality)
    return replace(team, allow=allow, downgrade=Downgrade(fallback_model=fallback))


@dataclass(frozen=True)
class Sent:
    """One form of a request Tollgate may forward: its bytes and what it reserved for them."""

    body: bytes
    content_type: str
    bound_nanos: int
    bound_usage: Usage
    changes: str


def sent_forms(
    door: Door[Any], content_type: str, body: bytes, config: Config, team: Team
) -> list[Sent] | None:
    """Every form Tollgate may forward `body` in (as asked, then each downgrade), or None
    when Tollgate refuses it."""
    try:
        parsed = door.parse(content_type, body, config, team)
        start = door.admit(team, parsed, config)
    except RequestError:
        return None
    forms = []
    for variant in variants(start, team, config.prices):
        bound = door.bound(parsed, variant)
        data, sent_type = door.encode(parsed, variant)
        changes = ",".join(str(c) for c in variant.changes)
        forms.append(Sent(data, sent_type, bound.cost_nanos, bound.usage, changes))
    return forms


# -- the simulator's side ----------------------------------------------------------------


def raw_request(endpoint: Endpoint, body: bytes, content_type: str) -> RawRequest:
    """The forwarded bytes read as the simulated upstream reads them."""
    if content_type.startswith("application/json"):
        return parse_json(endpoint, body)

    async def read() -> RawRequest:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": f"/v1/images/{endpoint}",
            "headers": [(b"content-type", content_type.encode())],
        }
        return await parse_multipart(endpoint, Request(scope, receive))

    return asyncio.run(read())


@dataclass(frozen=True)
class Billed:
    """What the simulator bills for one request: nanos at its own rates and at Tollgate's."""

    sim_nanos: int
    book_nanos: int
    detail: str

    @property
    def nanos(self) -> int:
        return max(self.sim_nanos, self.book_nanos)


def _nanos(amount: Decimal) -> int:
    return math.ceil(amount * 10**9)


def _entry(
    endpoint: Any, order: ImageOrder | None, usage: BilledUsage | None, **more: Any
) -> Entry:
    return Entry(
        id="x",
        time=0.0,
        endpoint=endpoint,
        model=order.model.name if order else None,
        quality=order.quality if order else None,
        size=order.size if order else None,
        n=order.n if order else None,
        stream=False,
        status=200,
        billed=True,
        usage=usage,
        images=more.pop("images", order.n if order else 0),
        authorization=None,
        **more,
    )


def _book_cost(model: ModelPrices, usage: BilledUsage) -> int:
    """`usage` at the price book's rates. A kind the model has no rate for (text output
    of a model that publishes none, which the simulator reports under its `texttokens`
    fault and bills at 0) would be priced at a stand-in rate that no bound reserves:
    Tollgate's fail-closed settlement, not the upstream's bill, so left out here."""
    tokens = {
        "text_input": usage.text_input,
        "image_input": usage.image_input,
        "image_output": usage.image_output,
        "text_output": usage.text_output if "text_output" in model.rates else 0,
    }
    return model.cost(Usage(**tokens))  # type: ignore[arg-type]


def image_billed(order: ImageOrder, tokens: Tokens, book: PriceBook, batch: bool = False) -> Billed:
    """An Images API order's bill (`batch`: as a batch line, at the batch rate)."""
    model = book.find(order.model.name)
    assert model is not None, order.model.name
    if order.model.is_dalle:
        entry = _entry(order.endpoint, order, None)
        book_nanos = model.image_price_nanos(order.quality, order.size) * order.n
    else:
        usage = BilledUsage.of(tokens)
        entry = _entry(order.endpoint, order, usage, batch_id="b" if batch else None)
        priced = model.for_batch() if batch else model
        book_nanos = _book_cost(priced, usage)
    sim = _nanos(sum((line.amount for line in line_costs(entry)), Decimal(0)))
    return Billed(sim, book_nanos, f"{order} {tokens}")


def images_bill(endpoint: Endpoint, sent: Sent, book: PriceBook) -> Billed | None:
    """What the simulator bills for forwarded Images API bytes; None when it refuses them."""
    try:
        order = validate(raw_request(endpoint, sent.body, sent.content_type))
    except ApiError:
        return None
    # As the simulator's route plays a prompt's fault marker (those that bill other tokens).
    tokens = played_tokens(order, pick_fault(order.prompt, None))
    return image_billed(order, tokens, book)


def responses_bill(
    body: dict[str, Any], book: PriceBook, carried: int = 0
) -> tuple[Billed, MainlineUsage] | None:
    """What the simulator bills for a forwarded Responses body (`carried`: the tokens of
    the response it continues); None when it refuses it."""
    try:
        order = read_order(body)
    except ApiError:
        return None
    tokens = tokens_of(order, carried)
    tool = order.tool
    entry = Entry(
        id="x",
        time=0.0,
        endpoint="responses",
        model=tool.model.name if tool else None,
        quality=tool.quality if tool else None,
        size=tool.size if tool else None,
        n=order.image_calls,
        stream=order.stream,
        status=200,
        billed=True,
        usage=tokens.image_gen,
        images=order.image_calls,
        authorization=None,
        mainline_model=order.model.name,
        mainline=tokens.mainline,
    )
    sim = _nanos(sum((line.amount for line in line_costs(entry)), Decimal(0)))
    mainline = book.find_mainline(order.model.name)
    assert mainline is not None, order.model.name
    m = tokens.mainline
    book_nanos = mainline.cost(
        Usage(
            mainline_input=m.input - m.cached_input,
            mainline_cached_input=m.cached_input,
            mainline_output=m.output,
            mainline_cache_write=m.cache_write,
        )
    )
    if tool is not None:
        model = book.find(tool.model.name)
        assert model is not None
        book_nanos += _book_cost(model, tokens.image_gen)
    return Billed(sim, book_nanos, f"{order.model.name} {tokens}"), tokens.mainline


IMAGES = {e: ImagesDoor(e) for e in ("generations", "edits", "variations")}
RESPONSES = ResponsesDoor()


def check_images(
    endpoint: Endpoint, content_type: str, body: bytes, config: Config, team: Team
) -> int:
    """Assert the bound of every form Tollgate forwards covers the simulator's bill; the
    number of forms the simulator accepted."""
    forms = sent_forms(IMAGES[endpoint], content_type, body, config, team)
    accepted = 0
    for sent in forms or ():
        billed = images_bill(endpoint, sent, config.prices)
        if billed is None:
            continue
        accepted += 1
        assert billed.nanos <= sent.bound_nanos, (
            f"bound {sent.bound_nanos} < billed {billed.nanos} (sim {billed.sim_nanos}, "
            f"book {billed.book_nanos}) for {sent.body[:600]!r} [{sent.changes}]: {billed.detail}"
            f"; reserved {sent.bound_usage}"
        )
    return accepted
