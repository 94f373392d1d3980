"""Stored responses: what `retrieve`, `cancel`, `delete`, `input_items` and
`previous_response_id` find, kept in memory for one simulator (time passed in).

A background response is `queued` when created, `in_progress` until its run has passed
(`latency_ms`, and at least `background_ms`: OpenAI's take seconds), then final
(`completed`, `incomplete` or `failed`); it is billed (its entry added to the record) when
it is first seen final, by any later request to the simulator.

A response belongs to the project it was created under (the `OpenAI-Project` header, or
none): asked for under another, it is not found, as OpenAI answers.

Its messages are stored with it, by id: its input messages (`msg_in…`, as `input_items`
lists them) and its answer (`msg_…`). An input message that names one of them by its
`id` is read as stored, from any response of the project (OpenAI's store knows no team),
whatever content the request sends with it; an id nothing was stored under is OpenAI's
404 (`item`).

Cancelling (background responses only; OpenAI's rule) before the end stops the work:
the response is `cancelled`, billed for the mainline input it had read and nothing
else (no image was finished, no output written). Cancelling a finished response
returns it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.core.models import InputImage
from proxy.simulator.billing import BilledUsage, BillingRecord, Entry, MainlineUsage
from proxy.simulator.refusals import ApiError, invalid
from proxy.simulator.response_answers import Snapshot, Status
from proxy.simulator.response_tokens import ResponseTokens
from proxy.simulator.responses import ResponseOrder, StoredItem

MAX_STORED = 10_000


@dataclass
class StoredResponse:
    """One response as stored: its order, what it bills and where it stands."""

    id: str
    order: ResponseOrder
    tokens: ResponseTokens
    created_at: float
    ready_at: float
    final: Status
    padding: int = 0
    cancelled: bool = False
    pending: Entry | None = None
    """The record entry still to add (a background response not yet seen final)."""
    project: str | None = None
    """The `OpenAI-Project` it was created under (None: the key's default project)."""

    def status(self, now: float) -> Status:
        if self.cancelled:
            return "cancelled"
        if now < self.ready_at:
            return "queued" if now <= self.created_at else "in_progress"
        return self.final

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            self.id, self.order, self.tokens, int(self.created_at), self.status(now), self.padding
        )


def cancelled_tokens(tokens: ResponseTokens) -> ResponseTokens:
    """What a response cancelled before its end bills: the input its first sampling read,
    and nothing else."""
    read = tokens.mainline.input if tokens.first_input is None else tokens.first_input
    cached = min(tokens.mainline.cached_input, read)
    write = read - cached if tokens.mainline.cache_write else 0
    mainline = MainlineUsage(input=read, cached_input=cached, cache_write=write)
    return ResponseTokens(mainline, BilledUsage(), "", incomplete=False)


def item_not_found(item_id: str, store: bool) -> ApiError:
    """OpenAI's answer to an input item whose id names nothing it stored."""
    message = f"Item with id '{item_id}' not found."
    if not store:
        message += (
            " Items are not persisted when `store` is set to false. Try again with `store` "
            "set to true, or remove this item from your input."
        )
    return ApiError(404, message, param="input", code=None)


def stored_item(stored: StoredResponse, item_id: str) -> StoredItem | None:
    """The texts and images `stored` keeps under `item_id`, if it is one of its items."""
    short = stored.id.removeprefix("resp_")
    if item_id == f"msg_{short}":
        return [stored.tokens.answer], []
    for index, message in enumerate(stored.order.messages):
        if item_id == f"msg_in{index:02d}{short}":
            texts = [p["text"] for p in message["content"] if isinstance(p.get("text"), str)]
            images = [InputImage() for p in message["content"] if p["type"] == "input_image"]
            return texts, images
    return None


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", param=None, code=None)


class ResponseStore:
    """The simulator's stored responses, by id, oldest first."""

    def __init__(self) -> None:
        self._responses: dict[str, StoredResponse] = {}

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.id] = stored
        while len(self._responses) > MAX_STORED:
            oldest = next(iter(self._responses))
            if self._responses[oldest].pending is not None:
                break
            del self._responses[oldest]

    def get(self, response_id: str, project: str | None) -> StoredResponse:
        """The response `response_id`, asked for under `project`; OpenAI's 404 when there
        is none, or it is another project's."""
        stored = self._responses.get(response_id)
        if stored is None or stored.project != project:
            raise not_found(response_id)
        return stored

    def previous(self, response_id: str, project: str | None) -> StoredResponse:
        """The response `previous_response_id` names, asked for under `project`, or
        OpenAI's 404."""
        stored = self._responses.get(response_id)
        if stored is None or stored.project != project:
            raise ApiError(
                404,
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return stored

    def item(self, item_id: str, project: str | None, store: bool) -> StoredItem:
        """What the input item `item_id` reads, asked for under `project` by a request
        stored (`store`) or not; OpenAI's 404 when no response of that project holds it."""
        for stored in self._responses.values():
            if stored.project == project:
                found = stored_item(stored, item_id)
                if found is not None:
                    return found
        raise item_not_found(item_id, store)

    def delete(self, stored: StoredResponse) -> None:
        self._responses.pop(stored.id, None)

    def cancel(self, stored: StoredResponse, now: float, record: BillingRecord) -> StoredResponse:
        if not stored.order.background:
            raise invalid(
                "Only responses created with background=true can be cancelled.", param=None
            )
        if stored.status(now) in ("queued", "in_progress"):
            stored.cancelled = True
            stored.tokens = cancelled_tokens(stored.tokens)
            if stored.pending is not None:
                record.append(cancelled_entry(stored.pending, stored.tokens))
                stored.pending = None
        return stored

    def settle(self, now: float, record: BillingRecord) -> None:
        """Bill every background response that has reached its end."""
        for stored in self._responses.values():
            if stored.pending is not None and now >= stored.ready_at:
                record.append(stored.pending)
                stored.pending = None

    def clear(self) -> None:
        self._responses.clear()


def cancelled_entry(entry: Entry, tokens: ResponseTokens) -> Entry:
    return replace(entry, usage=tokens.image_gen, mainline=tokens.mainline, images=0)
