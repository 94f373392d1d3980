"""The simulator's record of what it would have billed: the oracle tests compare with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from proxy.core.models import Endpoint
from proxy.simulator.tokens import Tokens

RecordedEndpoint = Endpoint | Literal["responses"]
RECORDED_HEADERS = ("openai-organization", "openai-project", "x-stainless-retry-count")


@dataclass(frozen=True)
class BilledUsage:
    """Tokens billed for one request, by kind."""

    text_input: int = 0
    image_input: int = 0
    image_output: int = 0
    text_output: int = 0

    @classmethod
    def of(cls, tokens: Tokens) -> BilledUsage:
        return cls(tokens.text_input, tokens.image_input, tokens.output_total, tokens.text_output)


@dataclass(frozen=True)
class MainlineUsage:
    """The mainline model's tokens of one Responses request (its top-level `usage`)."""

    input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0
    cache_write: int = 0
    """Of the uncached input, the tokens written to the prompt cache."""


@dataclass(frozen=True)
class Entry:
    """One request that reached the simulator, as `GET /_sim/billing` shows it."""

    id: str
    time: float
    endpoint: RecordedEndpoint
    model: str | None
    """The image model (for `responses`, the image_generation tool's)."""
    quality: str | None
    size: str | None
    n: int | None
    stream: bool
    status: int
    billed: bool
    usage: BilledUsage | None
    images: int
    authorization: str | None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    image_count: int = 0
    mainline_model: str | None = None
    mainline: MainlineUsage | None = None
    """For `responses`: the mainline tokens billed; `usage` is then `tool_usage.image_gen`."""
    batch_id: str | None = None
    """For a line of a batch: its batch (billed at the batch rate, and `time` is when
    the batch ended, the day OpenAI books it on)."""
    custom_id: str | None = None
    """For a line of a batch: the line's `custom_id`."""
    data_residency: bool = False
    """Billed by a regional (data-residency) endpoint: its eligible models (the image
    model's and the mainline model's tokens apart) at `catalogue.DATA_RESIDENCY_UPLIFT`."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["headers"] = dict(self.headers)
        data["params"] = dict(self.params)
        return data


class BillingRecord:
    """An in-memory, append-only list of entries (cleared by `POST /_sim/reset`)."""

    def __init__(self, data_residency: Callable[[], bool] = lambda: False) -> None:
        self._entries: list[Entry] = []
        self.data_residency = data_residency
        """Whether the simulator bills as a regional endpoint (its knob), read as each
        entry is recorded."""

    def append(self, entry: Entry) -> None:
        if self.data_residency():
            entry = replace(entry, data_residency=True)
        self._entries.append(entry)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def to_json(self) -> dict[str, Any]:
        return {"requests": [entry.to_json() for entry in self._entries]}
