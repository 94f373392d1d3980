"""The metric catalogue (names, labels and values are a contract for `dashboards/`).

Built on prometheus-client with an explicit registry: nothing registers itself
at import. Costs are exported in USD (a float only here, at the edge); there is
no per-user label.

Two kinds of values:
- request-path counters, histograms and the in-flight gauge, kept per process.
  With several uvicorn workers `tollgate serve` points `PROMETHEUS_MULTIPROC_DIR`
  at a fresh directory before they start, each worker writes its values there,
  and a scrape sums every worker's files (the client's multiprocess mode);
- budget and rate-limit gauges, read from the ledger at scrape time and handed to
  `exposition()` as a snapshot, so every worker and replica tells the same truth.

A Responses request (`endpoint="responses"`) is labelled with its image tool's model;
its mainline model's tokens (`text_input`, `cached_text_input`, `text_output`) and
dollars are counted under the mainline model's name with `quality=""`, so that
`tollgate_cost_usd_total` still adds up to the ledger's spend. Its cost is also counted
in `tollgate_responses_cost_usd_total{team, model, part}` (`part`: `mainline` or
`image_tool`): the cost counter has no endpoint label (a contract of the dashboards), and
the Responses API's spend must still be told apart from the Images API's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Literal, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.core.models import NANOS_PER_USD, TOKEN_KINDS, Change, Entry, Settlement
from proxy.core.status import BudgetStatus, RateStatus
from proxy.metrics.text import MultiprocessText, RegistryText, label_text

UNPRICED = "(unpriced)"
"""The `model` label of a request for a model the price book does not know."""
CUSTOM_SIZE = "custom"
"""The `size` label of an image of a size its model does not list (an arbitrary size)."""

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
BUDGET_LABELS = ("scope", "team", "period")
RATE_LABELS = ("scope", "team", "per", "metric", "model")

M = TypeVar("M", Counter, Histogram)
_METRICS = (Counter, Gauge, Histogram)


class Children(Generic[M]):
    """The children of a labelled metric, by label values: `children(*values)`.

    `metric.labels(...)` checks and converts its arguments on every call, several times a
    request; a child never changes once made, so a dict finds it again.
    A child is still made only when its label values are first used, so the label sets a
    scrape shows are the same as with `labels()`. Values must be `str` (as `labels()` would
    make them).
    """

    __slots__ = ("_made", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._made: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._metric.labels(*values)
        return child


class Dollars:
    """The children of a dollar counter, each added to in nanos (`dollars(*values).add(n)`).

    A counter adds floats: $0.032 then $0.02 made 0.052000000000000005, and over a month of
    requests such sums drift from the ledger's. Each child's total is kept here as an
    integer of nanos, and the counter's value is set to it, converted once: the value
    shown is always the nearest float to the exact sum (a worker's, in multiprocess
    mode, where `MultiprocessText` sums the workers' totals exactly too)."""

    __slots__ = ("_children", "_nanos")

    def __init__(self, metric: Counter) -> None:
        self._children = Children(metric)
        self._nanos: dict[tuple[str, ...], int] = {}

    def add(self, nanos: int, *values: str) -> None:
        child = self._children(*values)
        before = self._nanos.get(values)
        if before is None:
            # What the child holds already: in multiprocess mode, a worker given the pid of
            # one that died reads that one's file, whose dollars stay counted, as `inc` would
            # have carried them on.
            before = round(child._value.get() * NANOS_PER_USD)
        total = self._nanos[values] = before + nanos
        # prometheus-client's own value holder (a lock, or the worker's mmapped file), set
        # as `inc` would add: the counter is still the client's, scraped as any other.
        child._value.set(total / NANOS_PER_USD)


DOLLAR_COUNTERS = frozenset(
    {"tollgate_cost_usd", "tollgate_responses_cost_usd", "tollgate_reserved_usd"}
)
"""The counters of US dollars, each kept exact (`Dollars`)."""


class Metrics:
    """The request-path metrics of one process.

    `multiprocess_dir` (the value of `PROMETHEUS_MULTIPROC_DIR`, which must be set before
    prometheus-client is imported) makes `exposition()` sum every worker's values.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self._ended(self.registry)
        self._upstream_and_keys(self.registry)
        self._load(self.registry)
        # Every metric above, in the order it was registered (attributes keep the order in
        # which they were set, each right as it was made and registered).
        self._text = RegistryText([m for m in vars(self).values() if isinstance(m, _METRICS)])
        self._workers = (
            MultiprocessText(multiprocess_dir, DOLLAR_COUNTERS) if multiprocess_dir else None
        )
        # The request path finds its children here (see `Children`).
        self._requests = Children(self.requests)
        self._tokens = Children(self.tokens)
        self._cost = Dollars(self.cost)
        self._responses_cost = Dollars(self.responses_cost)
        self._reserved = Dollars(self.reserved)
        self._images = Children(self.images)
        self._downgrades = Children(self.downgrades)
        self._upstream_duration = Children(self.upstream_duration)
        self._unauthenticated = Children(self.unauthenticated_requests)
        self._rate_limited = Children(self.rate_limited_requests)
        self._upstream_limited = Children(self.upstream_rate_limited)

    def _upstream_and_keys(self, r: CollectorRegistry) -> None:
        """How long the upstream took, and the requests refused for their key."""
        self.upstream_duration = Histogram(
            "tollgate_upstream_request_duration_seconds",
            "Time from sending a request upstream to the end of its answer.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.unauthenticated_requests = Counter(
            "tollgate_unauthenticated_requests",
            "Requests refused for a missing or unknown key (kept out of the ledger: anyone "
            "can send them), by endpoint (or passthrough) and reason.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.rate_limited_requests = Counter(
            "tollgate_rate_limited",
            "Requests refused by a rate limit (429 rate_limit_exceeded), by the window and "
            "metric of the limit that refused.",
            ["team", "per", "metric"],
            registry=r,
        )
        self.upstream_rate_limited = Counter(
            "tollgate_upstream_rate_limited",
            "Requests OpenAI answered 429 (its own rate limits or quota).",
            ["team", "model"],
            registry=r,
        )

    def _ended(self, r: CollectorRegistry) -> None:
        """What `finished` counts: requests by outcome, tokens, dollars metered and reserved,
        images, downgrades."""
        self.requests = Counter(
            "tollgate_requests",
            "Requests by outcome.",
            ["team", "model", "endpoint", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "tollgate_tokens", "Tokens metered, by kind.", ["team", "model", "kind"], registry=r
        )
        self.cost = Counter(
            "tollgate_cost_usd",
            "Metered cost in US dollars.",
            ["team", "model", "quality"],
            registry=r,
        )
        self.responses_cost = Counter(
            "tollgate_responses_cost_usd",
            "Metered cost of Responses API requests (batched ones included) in US dollars, by "
            "part: the mainline model's tokens (part=mainline) or the image_generation "
            "tool's (part=image_tool). Also counted in tollgate_cost_usd_total.",
            ["team", "model", "part"],
            registry=r,
        )
        self.reserved = Counter(
            "tollgate_reserved_usd",
            "Estimated (reserved) cost of forwarded requests in US dollars, counted when they "
            "settle; compare with tollgate_cost_usd_total for the estimation drift.",
            ["team", "model"],
            registry=r,
        )
        self.images = Counter(
            "tollgate_images", "Images billed.", ["team", "model", "quality", "size"], registry=r
        )
        self.downgrades = Counter(
            "tollgate_downgrades",
            "Downgrades applied, by knob and reason.",
            ["team", "knob", "reason"],
            registry=r,
        )

    def _load(self, r: CollectorRegistry) -> None:
        """What the process holds now, and what it refused to protect itself."""
        self.inflight = Gauge(
            "tollgate_inflight_requests",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.body_bytes = Gauge(
            "tollgate_inflight_body_bytes",
            "Request-body bytes held in memory, as charged against limits.inflight_bytes "
            "(3 times each body's length).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batches_refused = Gauge(
            "tollgate_batches_refused",
            "Batches followed whose latest poll the upstream answered 401 or 403 (the company "
            "key revoked, or its project changed): each keeps its reservation held, as the "
            "upstream may still run and bill it, until a poll reads it again.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.responses_refused = Gauge(
            "tollgate_background_responses_refused",
            "Background responses followed whose latest poll the upstream answered 401 or 403 "
            "(the company key revoked, or its project changed): each keeps its reservation "
            "held, as the upstream may still run and bill it, until a poll reads it again.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.overload_refusals = Counter(
            "tollgate_overload_refusals",
            "Requests refused to protect the process: inflight_bytes (503), connections "
            "(503), body_timeout (408).",
            ["reason"],
            registry=r,
        )

    def started(self) -> None:
        self.inflight.inc()

    def abandoned(self) -> None:
        """A request `started` that a fault of Tollgate's own ended before it could finish."""
        self.inflight.dec()

    def finished(
        self,
        entry: Entry,
        settlement: Settlement,
        changes: Sequence[Change],
        priced: Callable[[str], bool] | None = None,
        listed: Callable[[str, str], bool] | None = None,
    ) -> None:
        """Count a request that has ended, whatever its outcome.

        A Responses request is billed under two models: its image tool's (`entry.model`,
        the request's own label) and its mainline model's, whose tokens and dollars are
        counted under that model with `quality=""`. One that makes no image records no
        image model: its own label is then its mainline model's. A batch's
        `/v1/responses` line is one too (`endpoint="batches"`, a mainline model named):
        both parts of its cost are
        Responses API spend (its image tool's part used to be left out of
        `tollgate_responses_cost_usd_total`, its mainline part counted).

        A model name `priced` does not know (any string a client sent, refused as
        unpriced) is counted as `UNPRICED`: a label value a client chooses would make one
        series per name, without bound. So would a size: an image of a size `listed` does
        not give for its model (gpt-image-2 takes some 29,000 sizes) is counted under the
        size `custom`."""
        self.inflight.dec()
        team = entry.team or ""
        model = entry.model or entry.model_requested or entry.mainline_model or ""
        if model and priced is not None and not priced(model):
            model = UNPRICED
        self._requests(team, model, entry.endpoint or "", settlement.outcome).inc()
        # One downgrade per knob and reason of the request, however many steps of the
        # ladder it went down (high -> medium -> low is one quality downgrade, as the
        # `x-tollgate-downgraded` header and the ledger's `downgrades` say).
        for knob, reason in dict.fromkeys((c.knob, c.reason) for c in changes):
            self._downgrades(team, knob, reason).inc()
        usage = settlement.usage
        for kind in TOKEN_KINDS:
            count = usage.tokens(kind)
            if count:
                self._tokens(team, model, kind).inc(count)
        quality = entry.quality or ""
        mainline = entry.mainline_model
        # Without a mainline model to name, every dollar stays on the request's own label:
        # the two parts always add up to the ledger's cost.
        image_nanos = settlement.cost_nanos - (settlement.mainline_cost_nanos if mainline else 0)
        if image_nanos:
            self._cost.add(image_nanos, team, model, quality)
            if entry.endpoint == "responses" or mainline:
                self._responses_cost.add(image_nanos, team, model, "image_tool")
        if mainline:
            self._mainline(team, mainline, settlement)
        if entry.estimated_nanos:
            self._reserved.add(entry.estimated_nanos, team, model)
        if usage.images and 200 <= settlement.status < 300:
            size = entry.size or ""
            if size and listed is not None and not listed(model, size):
                size = CUSTOM_SIZE
            self._images(team, model, quality, size).inc(usage.images)
        if settlement.outcome == "upstream_error" and settlement.status == 429:
            self._upstream_limited(team, model).inc()

    def _mainline(self, team: str, model: str, settlement: Settlement) -> None:
        """The Responses API mainline model's tokens and dollars, under its own name."""
        usage = settlement.usage
        for kind, count in (
            ("text_input", usage.mainline_input),
            ("cached_text_input", usage.mainline_cached_input),
            ("text_output", usage.mainline_output),
        ):
            if count:
                self._tokens(team, model, kind).inc(count)
        nanos = settlement.mainline_cost_nanos
        if nanos:
            self._cost.add(nanos, team, model, "")
            self._responses_cost.add(nanos, team, model, "mainline")

    def unauthenticated(self, endpoint: str, reason: str) -> None:
        """Count a request refused for its key (`endpoint`: an image endpoint or
        `passthrough`; `reason`: missing_key or invalid_key)."""
        self._unauthenticated(endpoint, reason).inc()

    def rate_limited(self, team: str, per: str, metric: str) -> None:
        """Count a request refused by one of its rate limits."""
        self._rate_limited(team, per, metric).inc()

    def followed_refused(self, kind: Literal["batch", "response"], refused: bool) -> None:
        """The polls of a followed batch or background response began (`refused`) or ceased
        to be answered 401 or 403."""
        gauge = self.batches_refused if kind == "batch" else self.responses_refused
        if refused:
            gauge.inc()
        else:
            gauge.dec()

    def refused(self, reason: str) -> None:
        """Count a request refused to protect the process (not for a client's fault)."""
        self.overload_refusals.labels(reason).inc()

    def upstream(self, model: str, endpoint: str, seconds: float) -> None:
        self._upstream_duration(model, endpoint).observe(seconds)

    def exposition(
        self, budgets: Sequence[BudgetStatus] = (), rates: Sequence[RateStatus] = ()
    ) -> bytes:
        """The text format of every metric: this process's (or every worker's) values and
        the gauges of `budgets` and `rates`, snapshots read from the ledger for this scrape."""
        # Every worker's values or this process's, written without generate_latest (see
        # `MultiprocessText` and `RegistryText`).
        own = self._workers.text() if self._workers else self._text.text()
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(RateCollector(rates))
        # The budget gauges come last, as their collector would: written directly, not
        # through generate_latest (15,000 samples for 1,000 teams took it 100 ms).
        return own + generate_latest(scrape) + BudgetCollector(budgets).text()

    def close(self) -> None:
        """This worker stops: its in-flight gauge no longer counts."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


class BudgetCollector(Collector):
    """The budget gauges of one snapshot (USD budgets: a token budget has no dollars, and
    its utilization would collide with the USD budget of the same period)."""

    def __init__(self, budgets: Sequence[BudgetStatus]) -> None:
        self.budgets = budgets

    def describe(self) -> Iterable[Metric]:
        return self.families({})

    def collect(self) -> Iterable[Metric]:
        return self.families(self.tightest())

    def tightest(self) -> dict[tuple[str, str, str], BudgetStatus]:
        """One USD budget per (scope, team, period): the most used one."""
        found: dict[tuple[str, str, str], BudgetStatus] = {}
        for b in self.budgets:
            if b.metric != "usd" or b.scope == "user":
                continue
            key = (b.scope, b.team, b.period)
            if key not in found or b.utilization > found[key].utilization:
                found[key] = b
        return found

    @staticmethod
    def families(budgets: dict[tuple[str, str, str], BudgetStatus]) -> list[Metric]:
        found: list[Metric] = []
        for name, doc, value_of in BUDGET_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=list(BUDGET_LABELS))
            for key, b in budgets.items():
                value = value_of(b)
                if value is not None:
                    family.add_metric(list(key), value)
            found.append(family)
        return found

    def text(self) -> bytes:
        """The families in the text format, as `generate_latest` writes them."""
        budgets = self.tightest()
        labels = {key: _labels(key) for key in budgets}
        # Limits, period ends and zeros repeat across thousands of budgets: each value is
        # formatted once a scrape.
        numbers: dict[float, str] = {}
        lines = []
        for name, doc, value_of in BUDGET_GAUGES:
            lines.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
            for key, b in budgets.items():
                value = value_of(b)
                if value is not None:
                    number = numbers.get(value)
                    if number is None:
                        number = numbers[value] = floatToGoString(value)  # type: ignore[no-untyped-call]
                    lines.append(f"{name}{labels[key]} {number}\n")
        return "".join(lines).encode()


class RateCollector(Collector):
    """The rate-limit gauges of one snapshot: each team's limits and the organization's, in
    their current windows (`team=""` for the organization, `model=""` for all models)."""

    def __init__(self, rates: Sequence[RateStatus]) -> None:
        self.rates = rates

    def describe(self) -> Iterable[Metric]:
        return self.families(())

    def collect(self) -> Iterable[Metric]:
        return self.families(self.rates)

    @staticmethod
    def families(rates: Sequence[RateStatus]) -> list[Metric]:
        labels = list(RATE_LABELS)
        used = GaugeMetricFamily(
            "tollgate_rate_limit_used",
            "What the rate limit's current window counted (images, requests or tokens).",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "tollgate_rate_limit_limit", "The rate limit per window.", labels=labels
        )
        for r in rates:
            values = [r.scope, r.team, r.limit.per, r.limit.metric, r.limit.model or ""]
            used.add_metric(values, r.used)
            limit.add_metric(values, r.limit.limit)
        return [used, limit]


@functools.lru_cache(maxsize=1 << 16)
def _labels(key: tuple[str, str, str]) -> str:
    """A budget's labels as the text format writes them: by name, values escaped."""
    return label_text(BUDGET_LABELS, key)


BUDGET_GAUGES: tuple[tuple[str, str, Callable[[BudgetStatus], float | None]], ...] = (
    ("tollgate_budget_limit_usd", "Budget limit in US dollars.", lambda b: b.limit / NANOS_PER_USD),
    (
        "tollgate_budget_spent_usd",
        "Settled spend in the budget's current period, in US dollars.",
        lambda b: b.spent / NANOS_PER_USD,
    ),
    (
        "tollgate_budget_reserved_usd",
        "Spend held by requests in flight, in US dollars.",
        lambda b: b.reserved / NANOS_PER_USD,
    ),
    (
        "tollgate_budget_utilization_ratio",
        "Settled spend over the limit (1 = exhausted).",
        lambda b: float(b.utilization),
    ),
    (
        "tollgate_budget_period_end_timestamp_seconds",
        "When the budget's current period ends (unix seconds; none for `total`).",
        lambda b: b.window.end,
    ),
)
"""Each budget gauge: name, help and its value for a budget (None: no sample)."""
