"""One team near its hard limit, spending through every door at once, while a process is
killed (SIGKILL) in the middle: image generations (whole and streamed), edits, Responses
requests (whole, streamed and in the background) and batches, over two replicas on
PostgreSQL or a two-worker server on SQLite. After a restart and housekeeping:

- what the upstream billed, at its own rates, is within the limit;
- the ledger charged at least that (a request whose outcome died with its process at its
  bound), and its charges are within the limit too;
- nothing is left reserved: no request, response or batch."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai

from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.costs import line_costs
from tests.batches_e2e import jsonl, png_bytes
from tests.conftest import (
    Simulator,
    Tollgate,
    key_hash,
    start_tollgate,
    workers_of,
    write_config,
)

KEY = "tg_test_mixed_storm_key_0001"
LIMIT = Decimal("0.30")
LOW = {"quality": "low", "size": "1024x1024"}
ENDED = ("completed", "failed", "expired", "cancelled")


def mixed_config(root: Path, simulator: Simulator) -> None:
    write_config(
        root,
        f"{simulator.url}/v1",
        teams={
            "mixed": f"name: mixed\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
            f"budgets:\n  - {{period: month, limit_usd: {LIMIT}}}\non_exhausted: reject\n"
        },
    )


def billed_usd(records: list[dict[str, Any]]) -> Decimal:
    """What the upstream billed for `records`, at its own rates."""
    total = Decimal(0)
    for record in records:
        fields = {
            **record,
            "usage": BilledUsage(**record["usage"]) if record["usage"] else None,
            "mainline": MainlineUsage(**record["mainline"]) if record["mainline"] else None,
        }
        entry = Entry(**{k: v for k, v in fields.items() if k in Entry.__dataclass_fields__})
        total += sum((line.amount for line in line_costs(entry)), Decimal(0))
    return total


async def spend(url: str, tag: str) -> list[str]:
    """Every door at once, through the official client; what each attempt came to."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    outcomes: list[str] = []

    async def attempt(what: str, call: Any) -> None:
        try:
            await call
            outcomes.append(f"{what}:ok")
        except openai.APIStatusError as exc:
            outcomes.append(f"{what}:{exc.status_code}")
        except (openai.APIConnectionError, openai.APITimeoutError):
            outcomes.append(f"{what}:gone")

    async def streamed_image(i: int) -> None:
        stream = await client.images.generate(
            model="gpt-image-2", prompt=f"{tag} streamed {i}", stream=True, partial_images=1, **LOW
        )
        async for _ in stream:
            pass

    async def edit(i: int) -> None:
        await client.images.edit(
            model="gpt-image-1.5", image=("in.png", png_bytes()), prompt=f"{tag} edit {i}", **LOW
        )

    async def response(i: int) -> None:
        tool = {"type": "image_generation", "model": "gpt-image-2", **LOW}
        asked: dict[str, Any] = {"model": "gpt-4.1-mini", "tools": [tool],
                                 "input": f"{tag} draw {i}", "max_output_tokens": 400}  # fmt: skip
        if i % 3 == 1:
            stream = await client.responses.create(**asked, stream=True)
            async for _ in stream:
                pass
        elif i % 3 == 2:
            await client.responses.create(**asked, background=True)
        else:
            await client.responses.create(**asked)

    async def batch(i: int) -> None:
        lines = [
            {"custom_id": f"{tag}-{i}-{j}", "method": "POST", "url": "/v1/images/generations",
             "body": {"model": "gpt-image-1.5", "prompt": f"{tag} batch {i} {j}", **LOW}}
            for j in range(3)
        ]  # fmt: skip
        uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )

    calls = [  # the slowest to reserve first: a batch uploads its file before it asks
        *(attempt("batch", batch(i)) for i in range(2)),
        *(attempt("response", response(i)) for i in range(9)),
        *(attempt("edit", edit(i)) for i in range(6)),
        *(attempt("streamed", streamed_image(i)) for i in range(6)),
        *(attempt("image", client.images.generate(model="gpt-image-2", prompt=f"{tag} {i}", **LOW))
          for i in range(24)),
    ]  # fmt: skip
    await asyncio.gather(*calls)
    await client.close()
    return outcomes


def exhausted(outcomes: list[str]) -> None:
    """The last wave reached the limit: the budget refused some of it."""
    assert any(o.endswith(":429") for o in outcomes), outcomes


def reserved(gate: Tollgate) -> int:
    found = gate.query("SELECT count(*) AS n FROM requests WHERE state = 'reserved'")
    return int(found[0]["n"])


async def kill_when_busy(gate: Tollgate, victims: list[int]) -> None:
    while await asyncio.to_thread(reserved, gate) < 5:
        await asyncio.sleep(0.02)
    for victim in victims:
        os.kill(victim, signal.SIGKILL)


def settle_everything(gate: Tollgate) -> None:
    """Wait until every batch has ended upstream and been settled, and nothing is held."""
    client = openai.OpenAI(base_url=f"{gate.url}/v1", api_key=KEY, max_retries=2)
    deadline = time.monotonic() + 150
    while True:
        held = gate.query("SELECT sum(reserved_nanos) AS n FROM budget_usage")[0]["n"] or 0
        batches = list(client.batches.list())
        open_batches = [b.id for b in batches if b.status not in ENDED]
        if not held and not open_batches:
            return
        assert time.monotonic() < deadline, f"still held: {held} nanos, batches {open_batches}"
        time.sleep(0.5)


def check(gate: Tollgate, simulator: Simulator, billed_before: int) -> None:
    [usage] = gate.query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'team' AND team = 'mixed' AND period = 'month'"
    )
    spent = Decimal(usage["spent_nanos"]) / 10**9
    records = simulator.billing()[billed_before:]
    billed = billed_usd(records)
    assert int(usage["reserved_nanos"]) == 0
    assert billed <= LIMIT, f"the upstream billed {billed} past the limit {LIMIT}"
    assert spent <= LIMIT, f"the ledger settled {spent} past the limit {LIMIT}"
    # Each charge is at least its bill (at its bound when unknown), up to rounding up to
    # the nano-dollar per line.
    assert math.floor(billed * 10**9) <= int(usage["spent_nanos"]) + len(records)
    rows = gate.query("SELECT state FROM requests WHERE team = 'mixed'")
    assert {r["state"] for r in rows} <= {"settled", "refused"}, rows


def test_every_door_at_once_over_two_replicas_one_killed_stays_within_the_limit(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    mixed_config(tmp_path, simulator)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=800, batch_delay_ms=2000)
    first, second = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    again = None
    try:

        async def storm() -> None:
            await asyncio.gather(
                spend(first.url, "a"),
                spend(second.url, "b"),
                kill_when_busy(first, [first.process.pid]),
            )

        asyncio.run(storm())
        first.process.wait()
        again = start_tollgate(tmp_path, ledger_url=shared)
        exhausted(asyncio.run(spend(again.url, "c")))
        simulator.configure(latency_ms=0)
        settle_everything(again)
        check(again, simulator, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        for gate in (again, second, first):
            if gate is not None:
                gate.stop()


def test_every_door_at_once_on_a_two_worker_server_one_worker_killed_stays_within_the_limit(
    simulator: Simulator, tmp_path: Path
) -> None:
    mixed_config(tmp_path, simulator)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=800, batch_delay_ms=2000)
    gate = start_tollgate(tmp_path, "--workers", "2")
    again = None
    try:

        async def storm() -> None:
            victim = workers_of(gate.process.pid)[:1]
            await asyncio.gather(spend(gate.url, "w"), kill_when_busy(gate, victim))

        asyncio.run(storm())
        gate.stop()
        again = start_tollgate(tmp_path, "--workers", "2")
        exhausted(asyncio.run(spend(again.url, "x")))
        simulator.configure(latency_ms=0)
        settle_everything(again)
        check(again, simulator, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        for each in (again, gate):
            if each is not None:
                each.stop()
