"""A background response held across a price change: one adopted by another process (a
restart, or a worker a reload replaced) after the price book raised a rate settles within
what it was reserved at, as one settled by the process that sent it does."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import Simulator, start_tollgate, write_config
from tests.responses_e2e import TEAMS, rows_of, settled_row, tool

__all__: list[str] = []


def price_book(image_output: str) -> str:
    """gpt-image-2's built-in rates, its image output at `image_output` per million."""
    return (
        'models:\n  gpt-image-2:\n    rates: {text_input: "5.00", cached_text_input: "1.25", '
        f'image_input: "8.00", cached_image_input: "2.00", image_output: "{image_output}"}}\n'
    )


def test_an_adopted_background_response_settles_within_its_reservation_at_new_rates(
    simulator: Simulator, tmp_path: Path
) -> None:
    (tmp_path / "prices.yaml").write_text(price_book("30.00"))
    write_config(tmp_path, f"{simulator.url}/v1", "prices: prices.yaml\n", TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=4000)  # queued while Tollgate restarts
    try:
        # Closed before SIGTERM: a stopping server waits for an idle connection's next
        # request (up to its keep-alive timeout), and the response would end meanwhile.
        with first.client() as client:
            queued = client.responses.create(
                model="gpt-5.5",
                input="A comet",
                tools=[tool(quality="high")],
                max_output_tokens=300,
                max_tool_calls=1,
                background=True,
            )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=30)
    [held] = rows_of(first, queued.id)
    assert (held["state"], held["held"]) == ("reserved", 1)
    (tmp_path / "prices.yaml").write_text(price_book("120.00"))
    second = start_tollgate(tmp_path)
    try:
        row = settled_row(second, queued.id)
        assert row["owner"] != held["owner"]  # adopted
        assert row["cost_nanos"] <= held["estimated_nanos"], (row["cost_nanos"], held)
        [counted] = second.query(
            "SELECT spent_nanos, reserved_nanos FROM budget_usage "
            "WHERE scope = 'organization' AND period = 'total'"
        )
        assert (counted["spent_nanos"], counted["reserved_nanos"]) == (row["cost_nanos"], 0)
    finally:
        second.stop()
