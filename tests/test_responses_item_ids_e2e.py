"""Input items that carry an `id`, end to end: OpenAI reads the item it stored under an
id (the company key's store, every team's) rather than what is sent with it, so Tollgate
forwards no item's id. Another team's ids then read nothing of its items, show nothing of
their existence, and bill nothing Tollgate did not see in the body."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import RESEARCH_KEY, Simulator, Tollgate
from tests.responses_e2e import billed, calm, proxy, settled_row

__all__ = ["calm", "proxy"]  # the shared fixtures

SECRET = "The design team's unreleased campaign, every line of it. " * 700
"""About 40 KB: some 10,000 input tokens, more than a short request's bound."""


def items(item_id: str | None) -> list[dict[str, Any]]:
    named = {"type": "message", "role": "user", "content": "x"}
    if item_id is not None:
        named["id"] = item_id
    return [named, {"role": "user", "content": "Summarise what you read"}]


def test_another_teams_item_ids_read_nothing_and_bill_only_what_is_sent(
    proxy: Tollgate, simulator: Simulator
) -> None:
    made = proxy.client().responses.create(model="gpt-5.5", input=SECRET, max_output_tokens=300)
    short = made.id.removeprefix("resp_")
    research = proxy.client(RESEARCH_KEY)

    def read(item_id: str | None) -> tuple[int, int]:
        """(mainline input billed, input tokens counted) with `item_id` on the first item."""
        raw = research.responses.with_raw_response.create(
            model="gpt-5.5", input=items(item_id), max_output_tokens=300
        )
        body = json.loads(raw.content)
        record = billed(simulator, body["id"])
        row = settled_row(proxy, body["id"])
        assert row["estimated_nanos"] >= row["cost_nanos"]
        assert (row["flagged"], row["outcome"]) == (0, "ok")
        count = research.responses.input_tokens.count(model="gpt-5.5", input=items(item_id))
        return record["mainline"]["input"], count.input_tokens

    sent = read(None)
    # The design team's stored input message and answer, and an id nothing was stored
    # under: each is read as the one letter sent, never as what the design team stored
    # (its 40 KB prompt, billed past the bound), nor refused as unknown (a probe).
    for item_id in (f"msg_in00{short}", f"msg_{short}", "msg_nothing_stored_under_this"):
        assert read(item_id) == sent
    assert sent[0] < len(SECRET) // 8


def test_a_teams_own_output_sent_back_whole_is_read_as_sent(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The manual way to carry a conversation on (`input += response.output`) still works:
    the items are read as sent, the answer settled at what was billed, within its bound."""
    design = proxy.client()
    first = design.responses.create(model="gpt-5.5", input="Name a colour", max_output_tokens=300)
    assert [item.type for item in first.output] == ["message"]
    history = [item.model_dump(exclude_none=True) for item in first.output]
    assert history[0]["id"].startswith("msg_")
    again = design.responses.with_raw_response.create(
        model="gpt-5.5",
        input=[
            {"role": "user", "content": "Name a colour"},
            *history,
            {"role": "user", "content": "Another"},
        ],
        max_output_tokens=300,
    )
    body = json.loads(again.content)
    record = billed(simulator, body["id"])
    row = settled_row(proxy, body["id"])
    assert row["estimated_nanos"] >= row["cost_nanos"] > 0
    assert (
        row["mainline_input_tokens"] + row["mainline_cached_input_tokens"]
        == (record["mainline"]["input"])
    )
