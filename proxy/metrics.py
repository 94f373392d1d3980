"""The metric catalogue (names are a contract for the dashboards, SPEC §8).

Built on prometheus-client with an explicit registry: nothing registers itself
at import. Costs are exported in USD (a float only here, at the edge); there is
no per-user label.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.ledger import Entry, Settlement
from proxy.models import NANOS_PER_USD, Change

LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
TOKEN_KINDS = ("text_input", "cached_text_input", "image_input", "cached_image_input",
               "image_output")  # fmt: skip


class Metrics:
    """The request-path metrics of one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.images = Counter(
            "tollgate_images", "Images billed.", ["team", "model", "quality", "size"], registry=r
        )
        self.downgrades = Counter(
            "tollgate_downgrades",
            "Downgrades applied, by knob and reason.",
            ["team", "knob", "reason"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "tollgate_upstream_request_duration_seconds",
            "Time from sending a request upstream to the end of its answer.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "tollgate_inflight_requests",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def started(self) -> None:
        self.inflight.inc()

    def finished(self, entry: Entry, settlement: Settlement, changes: Sequence[Change]) -> None:
        """Count a request that has ended, whatever its outcome."""
        self.inflight.dec()
        team = entry.team or ""
        model = entry.model or entry.model_requested or ""
        self.requests.labels(team, model, entry.endpoint or "", settlement.outcome).inc()
        for change in changes:
            self.downgrades.labels(team, change.knob, change.reason).inc()
        usage = settlement.usage
        for kind in TOKEN_KINDS:
            count = usage.tokens(kind)  # type: ignore[arg-type]
            if count:
                self.tokens.labels(team, model, kind).inc(count)
        quality = entry.quality or ""
        if settlement.cost_nanos:
            self.cost.labels(team, model, quality).inc(settlement.cost_nanos / NANOS_PER_USD)
        if usage.images and 200 <= settlement.status < 300:
            self.images.labels(team, model, quality, entry.size or "").inc(usage.images)

    def upstream(self, model: str, endpoint: str, seconds: float) -> None:
        self.upstream_duration.labels(model, endpoint).observe(seconds)
