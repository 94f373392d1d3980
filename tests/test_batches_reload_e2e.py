"""A batch file uploaded under one configuration and run as a batch after a reload: the batch
is reserved and checked under the configuration in force when it is created. A file priced
at last week's rates, or checked against last week's `allow` policy, would otherwise run
past the hard limit, or past the policy, that the team now has."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.batches_e2e import (
    GENERATIONS,
    KEYS,
    LOW,
    batch_cost,
    billed_lines,
    ended,
    generations,
    line,
    record_tokens,
    settled_rows,
    team,
    upload,
)
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)

ADMIN = "tg_admin_batches_reload"
DAY_MS = 86_400_000
RESPONSES = "/v1/responses"


def teams(limit_usd: str, max_quality: str) -> dict[str, str]:
    return {
        "tight": team(
            "tight",
            f"budgets:\n  - {{period: month, limit_usd: {limit_usd}}}\non_exhausted: reject\n",
        ),
        "strict": team("strict", f"allow:\n  max_quality: {max_quality}\n"),
    }


def price_book(image_output_batch_rate: str) -> str:
    """gpt-image-2's built-in entry, its batch image output at `image_output_batch_rate`."""
    return (
        'models:\n  gpt-image-2:\n    batch: {text_input: "2.50", cached_text_input: '
        '"0.625", image_input: "4.00", cached_image_input: "1.00", '
        f'image_output: "{image_output_batch_rate}"}}\n'
    )


@pytest.fixture
def gate(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    simulator.configure(latency_ms=0, fault=None, batch_delay_ms=400, batch_window_ms=DAY_MS)
    (tmp_path / "prices.yaml").write_text(price_book("15.00"))
    settings = f"timezone: UTC\nadmin_token: {ADMIN}\nprices: prices.yaml\n"
    write_config(tmp_path, f"{simulator.url}/v1", settings, teams=teams("100", "high"))
    proxy = start_tollgate(tmp_path)
    yield proxy
    proxy.stop()


def reload(gate: Tollgate, limit_usd: str, max_quality: str, rate: str) -> None:
    for name, text in teams(limit_usd, max_quality).items():
        (gate.root / "teams" / f"{name}.yaml").write_text(text)
    (gate.root / "prices.yaml").write_text(price_book(rate))
    answer = httpx.post(f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text


def test_a_batch_created_after_its_model_got_dearer_is_reserved_at_the_new_rates(
    gate: Tollgate,
) -> None:
    client = gate.client(KEYS["tight"])
    uploaded = upload(client, generations("gpt-image-2", 4))
    [stored] = gate.query(f"SELECT bound_nanos FROM stored_objects WHERE id = '{uploaded.id}'")
    bound = int(stored["bound_nanos"])
    # The limit holds the bound priced at upload, with room to spare, but not the same lines
    # at four times the image output rate.
    limit = Decimal(bound) * 3 / 2 / 10**9
    reload(gate, f"{limit:.9f}", "high", "60.00")
    try:
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
    except openai.RateLimitError as exc:
        assert exc.code == "budget_exceeded"
        assert not gate.query("SELECT id FROM requests WHERE state = 'reserved'")
        return
    ended(client, batch.id)
    spent = sum(int(r["cost_nanos"]) for r in settled_rows(gate, batch.id))
    assert spent <= limit * 10**9, f"settled {spent} nanos past a limit of {limit} USD"


def test_a_batch_created_after_the_policy_tightened_is_refused(gate: Tollgate) -> None:
    client = gate.client(KEYS["strict"])
    uploaded = upload(client, generations("gpt-image-2", 2, quality="high"))
    reload(gate, "100", "low", "15.00")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
    assert refused.value.code == "policy_violation"
    message = refused.value.message
    assert re.search(r"line 1: .*quality high", message) and "line 2" in message, message
    assert not gate.query("SELECT id FROM requests WHERE state = 'reserved'")


def test_a_batch_created_after_allow_params_tightened_is_refused_naming_the_line(
    gate: Tollgate,
) -> None:
    """`allow.params` holds at the create for a file uploaded before it was written: the
    line's fields as given are kept with it, not only its model, n, quality and size."""
    client = gate.client(KEYS["strict"])
    lines = generations("gpt-image-2", 2, **LOW)
    lines[0]["body"]["output_format"] = "png"
    assert lines[1]["body"]["output_format"] == "webp"
    uploaded = upload(client, lines)
    text = team("strict", "allow:\n  params:\n    output_format: [png]\n")
    (gate.root / "teams" / "strict.yaml").write_text(text)
    answer = httpx.post(f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
    assert refused.value.code == "policy_violation"
    assert refused.value.message.splitlines()[1:] == [
        "line 2: Team strict may not send output_format=webp (allow.params.output_format: png)."
    ]
    assert not gate.query("SELECT id FROM requests WHERE state = 'reserved'")


def test_a_responses_batch_is_refused_once_the_team_may_no_longer_use_responses(
    gate: Tollgate, simulator: Simulator
) -> None:
    """A reload takes `/v1/responses` out of the team's `allow.endpoints`: a file of
    `/v1/responses` lines uploaded before is refused at the create, the lines that call no
    image tool as those that do. Those were checked on their mainline model alone, and
    their batch ran past the team's endpoint policy."""
    client = gate.client(KEYS["strict"])
    plain = {"model": "gpt-5.5", "input": "a haiku about rain", "max_output_tokens": 400}
    tool = {"type": "image_generation", "model": "gpt-image-2", "quality": "low"}
    lines = [
        line("no-tool", plain, RESPONSES),
        line("tool-none", {**plain, "tools": [tool], "tool_choice": "none"}, RESPONSES),
    ]
    uploaded = upload(client, lines)
    text = team("strict", "allow:\n  endpoints: [batches, generations, edits]\n")
    (gate.root / "teams" / "strict.yaml").write_text(text)
    answer = httpx.post(f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.batches.create(
            input_file_id=uploaded.id, endpoint=RESPONSES, completion_window="24h"
        )
    assert refused.value.code == "policy_violation"
    assert [x.split(":")[0] for x in refused.value.message.splitlines()[1:]] == [
        "line 1",
        "line 2",
    ], refused.value.message
    assert "/v1/responses" in refused.value.message
    assert not gate.query("SELECT id FROM requests WHERE state = 'reserved'")
    page = httpx.get(
        f"{simulator.url}/v1/batches",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        params={"limit": 100},
    ).json()
    assert not [b for b in page["data"] if b["input_file_id"] == uploaded.id]


def test_a_batch_whose_file_still_fits_the_configuration_is_created(gate: Tollgate) -> None:
    client = gate.client(KEYS["strict"])
    uploaded = upload(client, generations("gpt-image-2", 2, **LOW))
    reload(gate, "100", "low", "15.00")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )
    assert ended(client, batch.id).status == "completed"


def test_a_batch_in_flight_when_its_model_gets_dearer_settles_within_its_reservation(
    gate: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=4000)
    client = gate.client(KEYS["tight"])
    uploaded = upload(client, generations("gpt-image-2", 4))
    [stored] = gate.query(f"SELECT bound_nanos FROM stored_objects WHERE id = '{uploaded.id}'")
    bound = int(stored["bound_nanos"])
    limit = Decimal(bound) * 3 / 2 / 10**9
    reload(gate, f"{limit:.9f}", "high", "15.00")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )
    # Reserved at 15.00 a million image output tokens; the book then says four times that.
    reload(gate, f"{limit:.9f}", "high", "60.00")
    assert client.batches.retrieve(batch.id).status not in ("completed", "failed")
    ended(client, batch.id)
    rows = settled_rows(gate, batch.id)
    spent = sum(int(r["cost_nanos"]) for r in rows)
    assert spent <= bound, f"settled {spent} nanos past the {bound} reserved"
    assert spent <= limit * 10**9


def test_a_batch_in_flight_when_its_model_gets_cheaper_settles_at_the_rates_it_was_reserved_at(
    gate: Tollgate, simulator: Simulator
) -> None:
    """Reserved at 15.00 a million batch image output tokens, then the book says 1.50: its
    lines used to settle at the new rate, a tenth of what the simulator billed at the rate
    it was reserved at (as no image request in flight is: it keeps its runtime's book)."""
    simulator.configure(batch_delay_ms=4000)
    client = gate.client(KEYS["tight"])
    batch = client.batches.create(
        input_file_id=upload(client, generations("gpt-image-2", 3)).id,
        endpoint=GENERATIONS,
        completion_window="24h",
    )
    reload(gate, "100", "high", "1.50")
    assert client.batches.retrieve(batch.id).status not in ("completed", "failed")
    ended(client, batch.id)
    rows = settled_rows(gate, batch.id)
    records = billed_lines(simulator, batch.id)
    assert len(rows) == len(records) == 3
    for row in rows:
        billed = batch_cost("gpt-image-2", record_tokens(records[row["custom_id"]]))
        assert int(row["cost_nanos"]) == billed, row


def test_a_batch_the_upstream_no_longer_knows_stays_held_until_it_is_gone(
    gate: Tollgate, simulator: Simulator
) -> None:
    """A reload moves the upstream to another account (a second simulator) while a batch
    runs on the first: asked there, the batch is not found. A few 404s do not free or
    settle it: its reservation stays held until the upstream has answered 404 for long
    enough (`GONE_POLLS` polls over `GONE_AFTER_S`), then each line is charged its bound,
    flagged `batch_not_found` (tests/test_batch_follow.py, on a clock of its own)."""
    simulator.configure(batch_delay_ms=4000)
    client = gate.client(KEYS["tight"])
    client.batches.create(
        input_file_id=upload(client, generations("gpt-image-2", 3)).id,
        endpoint=GENERATIONS,
        completion_window="24h",
    )
    [held] = gate.query("SELECT estimated_nanos FROM requests WHERE state = 'reserved'")
    elsewhere = start_simulator()
    try:
        settings = gate.root / "tollgate.yaml"
        settings.write_text(settings.read_text().replace(simulator.url, elsewhere.url))
        reload(gate, "100", "high", "15.00")
        time.sleep(3)  # several polls, each answered 404
        still = gate.query("SELECT estimated_nanos FROM requests WHERE state = 'reserved'")
        assert still == [held]
        assert not gate.query(
            "SELECT id FROM requests WHERE custom_id IS NOT NULL AND state = 'settled'"
        )
    finally:
        stop(elsewhere.process)


def test_a_batch_in_flight_when_its_model_leaves_the_batch_api_is_still_settled(
    gate: Tollgate, simulator: Simulator
) -> None:
    """A reload marks the model `batch: false` (OpenAI stopped taking it in batches) while
    a batch of it runs: OpenAI still bills the lines it ran. Settling them asked the new
    book for the model's batch rates, which it has no more: the settlement failed at every
    poll, the batch's spend never booked and its reservation held for good. Each line is
    charged its bound, flagged, as a line whose price cannot be read."""
    simulator.configure(batch_delay_ms=4000)
    client = gate.client(KEYS["tight"])
    batch = client.batches.create(
        input_file_id=upload(client, generations("gpt-image-2", 3)).id,
        endpoint=GENERATIONS,
        completion_window="24h",
    )
    (gate.root / "prices.yaml").write_text("models:\n  gpt-image-2:\n    batch: false\n")
    answer = httpx.post(f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text
    assert client.batches.retrieve(batch.id).status not in ("completed", "failed")
    ended(client, batch.id)
    rows = settled_rows(gate, batch.id)
    records = billed_lines(simulator, batch.id)
    assert len(rows) == len(records) == 3
    for row in rows:
        billed = batch_cost("gpt-image-2", record_tokens(records[row["custom_id"]]))
        assert int(row["cost_nanos"]) == int(row["estimated_nanos"]) >= billed > 0, row
        assert row["flagged"] == 1
    assert not gate.query("SELECT id FROM requests WHERE state = 'reserved'")
