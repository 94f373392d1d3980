"""A repeat waiting on its first attempt at that attempt's deadline: the first may have
read its whole answer just before it, and be keeping it (then settling) just after. The
repeat waits for that settlement, as long as the first's own process may take to write
it, rather than be forwarded the moment the deadline passes: a second upstream charge
for an answer that was about to be kept.

Tollgate runs in-process on an injected clock (`tests.test_deadlines`), so the moment the
deadline passes is the test's to choose.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from proxy.ledger import KeptAnswer
from proxy.web.gateway import Gateway
from tests.test_deadlines import (
    KEY,
    PLAIN,
    START,
    TOTAL_TIMEOUT_S,
    WAIT_S,
    Call,
    Harness,
    harness,
    root,
    simulated_body,
)

__all__ = ["root"]  # the fixture


ANSWER = simulated_body(PLAIN)
"""The JSON answer the simulator gives `PLAIN`."""


def keyed_call(app: Gateway, body: dict[str, Any], key: str) -> Call:
    """POST /v1/images/generations with an `Idempotency-Key`, by a client that stays."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    path = "generations"
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": f"/v1/images/{path}",
        "raw_path": f"/v1/images/{path}".encode(), "query_string": b"", "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                    (b"content-type", b"application/json"),
                    (b"idempotency-key", key.encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    task = asyncio.create_task(app(scope, receive, messages.put))  # type: ignore[arg-type]
    return Call(task, messages)


async def headers_of(call: Call) -> tuple[int, dict[str, str]]:
    start = await call.next()
    assert start["type"] == "http.response.start"
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


async def test_a_repeat_at_the_deadline_of_a_first_keeping_its_answer_is_replayed(
    root: Path,
) -> None:
    async with harness(root) as h:
        first = keyed_call(h.app, PLAIN, "k-1")
        await asyncio.wait_for(h.upstream.arrived.wait(), WAIT_S)
        h.now[0] = START + 60  # the client timed out, and retried
        repeat = keyed_call(h.app, PLAIN, "k-1")
        await asyncio.sleep(0.3)  # the repeat found the first in flight, and waits
        assert len(h.upstream.bodies) == 1
        ledger = h.services.ledger
        keep = ledger.keep_answer

        async def keep_at_the_deadline(answer: KeptAnswer, store_bytes: int) -> bool:
            # Read whole just before its deadline; kept as the deadline passes.
            h.now[0] = START + TOTAL_TIMEOUT_S
            await ledger.heartbeat()  # its process lives, and says so
            await asyncio.sleep(0.5)  # the repeat looks a few times meanwhile
            return await keep(answer, store_bytes)

        ledger.keep_answer = keep_at_the_deadline  # type: ignore[method-assign]
        [body] = h.upstream.bodies
        await body.chunks.put(ANSWER)
        await body.chunks.put(None)
        status, _ = await headers_of(first)
        assert status == 200
        await asyncio.sleep(0.3)
        forwarded = len(h.upstream.bodies)
        for late in h.upstream.bodies[1:]:  # a second attempt upstream: let it end
            await late.chunks.put(ANSWER)
            await late.chunks.put(None)
        status, headers = await headers_of(repeat)
        assert forwarded == 1, "the repeat was forwarded: a second upstream charge"
        assert status == 200 and headers["x-tollgate-cost-usd"] == "0"
        assert "x-tollgate-replay-of" in headers
        await settled_all(h)


async def settled_all(h: Harness) -> None:
    if h.services.tasks.running:
        await asyncio.wait_for(asyncio.gather(*h.services.tasks.running), WAIT_S)
