"""The simulator's start-up settings and the knobs that can change at runtime."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from proxy.simulator.faults import Fault, parse_fault

DEFAULT_BATCH_DELAY_MS = 1_500
DEFAULT_BACKGROUND_MS = 1_500
"""How long a background response runs at least: OpenAI answers every background create
`queued` and runs it afterwards, for seconds; without latency it would have ended before
its create was answered, so no client could see it queued, held or cancelled."""
DEFAULT_BATCH_WINDOW_MS = 24 * 3600 * 1000
"""OpenAI's only completion window, "24h"."""
_COUNTS = (
    "latency_ms", "payload_bytes", "batch_delay_ms", "batch_window_ms", "queue_ms",
    "background_ms", "batch_read_ms", "batch_answer_ms", "batch_answer_status",
    "batch_fail_status",
)  # fmt: skip


@dataclass(frozen=True)
class SimulatorSettings:
    """How a simulator starts: latency, image padding and the one API key it accepts."""

    latency_ms: int = 0
    """Added before answering (and spread over stream events)."""
    payload_bytes: int = 0
    """Pad each png/jpeg image to about this many bytes; 0 = natural size."""
    api_key: str | None = None
    """When set, any other Bearer key gets 401 invalid_api_key."""
    batch_delay_ms: int = DEFAULT_BATCH_DELAY_MS
    """How long a batch takes from `validating` to `completed`."""
    batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS
    """The simulated completion window: a batch not finalizing by then expires."""
    background_ms: int = DEFAULT_BACKGROUND_MS
    """How long a background response runs after its create is answered `queued`, at least
    (`latency_ms` when that is longer)."""
    data_residency: bool = False
    """Bill as a regional (data-residency) endpoint, e.g. eu.api.openai.com: eligible models
    at `catalogue.DATA_RESIDENCY_UPLIFT` times their rates."""


@dataclass(frozen=True)
class Knobs:
    """What `POST /_sim/config` changes for all later requests."""

    latency_ms: int = 0
    payload_bytes: int = 0
    fault: Fault | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    """Added to every answer of the simulated API (an upstream that says more than it
    should, e.g. `openai-organization`)."""
    batch_delay_ms: int = DEFAULT_BATCH_DELAY_MS
    batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS
    """Both apply to batches created later."""
    queue_ms: int = 0
    """How long a background response's create takes to be answered (`queued`): a slow
    create, which a client with a shorter timeout retries."""
    background_ms: int = DEFAULT_BACKGROUND_MS
    """How long a background response runs at least after it is answered `queued`."""
    batch_read_ms: int = 0
    """How long a batch create reads its input file before the batch exists and is
    answered: a create that outlives its client's timeout still creates the batch."""
    batch_answer_ms: int = 0
    """How long a batch create waits, once its batch exists (and is listed), before it is
    answered: a create whose answer is lost though its batch was made."""
    batch_answer_status: int = 0
    """When not 0, the HTTP status (a 5xx) a batch create is answered with once its batch
    exists: a gateway's error in front of a create that was made all the same."""
    batch_fail_status: int = 0
    """When not 0, the HTTP status (a 5xx) a batch create is answered with before any batch
    is made: a create that failed."""
    data_residency: bool = False
    """Requests billed from now on are billed as a regional endpoint bills them (a batch's
    lines: as the knob stands when the batch ends)."""

    @classmethod
    def of(cls, settings: SimulatorSettings) -> Knobs:
        return cls(
            settings.latency_ms,
            settings.payload_bytes,
            batch_delay_ms=settings.batch_delay_ms,
            batch_window_ms=settings.batch_window_ms,
            background_ms=settings.background_ms,
            data_residency=settings.data_residency,
        )

    def updated(self, changes: dict[str, Any]) -> Knobs:
        """These knobs with `changes` applied; raises ValueError naming a bad key or value."""
        unknown = changes.keys() - {*_COUNTS, "fault", "response_headers", "data_residency"}
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")

        def count(name: str, current: int) -> int:
            value = changes.get(name, current)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
            return value

        knobs = replace(
            self,
            latency_ms=count("latency_ms", self.latency_ms),
            payload_bytes=count("payload_bytes", self.payload_bytes),
            batch_delay_ms=count("batch_delay_ms", self.batch_delay_ms),
            batch_window_ms=count("batch_window_ms", self.batch_window_ms),
            queue_ms=count("queue_ms", self.queue_ms),
            background_ms=count("background_ms", self.background_ms),
            batch_read_ms=count("batch_read_ms", self.batch_read_ms),
            batch_answer_ms=count("batch_answer_ms", self.batch_answer_ms),
            batch_answer_status=count("batch_answer_status", self.batch_answer_status),
            batch_fail_status=count("batch_fail_status", self.batch_fail_status),
        )
        for name in ("batch_answer_status", "batch_fail_status"):
            if getattr(knobs, name) and not 500 <= getattr(knobs, name) <= 599:
                raise ValueError(f"{name} must be 0 or a 5xx status")
        if "data_residency" in changes:
            if not isinstance(changes["data_residency"], bool):
                raise ValueError("data_residency must be true or false")
            knobs = replace(knobs, data_residency=changes["data_residency"])
        if "fault" in changes:
            knobs = replace(knobs, fault=parse_fault(changes["fault"]))
        if "response_headers" in changes:
            extra = changes["response_headers"]
            if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
            ):
                raise ValueError("response_headers must map header names to strings")
            knobs = replace(knobs, response_headers=tuple(extra.items()))
        return knobs

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "payload_bytes": self.payload_bytes,
            "fault": self.fault,
            "response_headers": dict(self.response_headers),
            "batch_delay_ms": self.batch_delay_ms,
            "batch_window_ms": self.batch_window_ms,
            "queue_ms": self.queue_ms,
            "background_ms": self.background_ms,
            "batch_read_ms": self.batch_read_ms,
            "batch_answer_ms": self.batch_answer_ms,
            "batch_answer_status": self.batch_answer_status,
            "batch_fail_status": self.batch_fail_status,
            "data_residency": self.data_residency,
        }
