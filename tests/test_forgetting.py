"""What the lifespan's duties forget, and when: answers kept for repeats once past the
retry window, rate counts two days after their window started; a ledger error is logged
and tried again at the next turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.core.errors import LedgerError
from proxy.core.settings import Retries
from proxy.web import lifespan

NOW = 1_780_000_000.0


class Ledger:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail_first = fail_first

    async def forget_answers(self, before: float) -> int:
        return self._call("answers", before)

    async def forget_counts(self, before: float) -> int:
        return self._call("counts", before)

    def _call(self, what: str, before: float) -> int:
        self.calls.append((what, before))
        if self.fail_first and len(self.calls) == 1:
            raise LedgerError("ledger unreachable")
        return 0


def runtime(ledger: Ledger, window_s: float = 600.0) -> Callable[[], Any]:
    found = SimpleNamespace(
        ledger=ledger, clock=lambda: NOW, config=SimpleNamespace(retries=Retries(window_s=window_s))
    )
    return lambda: found


async def turns(duty: Any, ledger: Ledger, count: int) -> None:
    task = asyncio.create_task(duty)
    while len(ledger.calls) < count:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_kept_answers_are_forgotten_past_the_retry_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lifespan, "FORGET_EVERY_S", 0.001)
    ledger = Ledger()
    await turns(lifespan.forget_kept_answers(runtime(ledger, window_s=30.0)), ledger, 2)
    assert ledger.calls[:2] == [("answers", NOW - 30.0)] * 2


async def test_rate_counts_are_forgotten_two_days_after_their_window_started(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lifespan, "FORGET_EVERY_S", 0.001)
    ledger = Ledger(fail_first=True)
    await turns(lifespan.forget_rate_counts(runtime(ledger)), ledger, 2)
    assert ledger.calls[:2] == [("counts", NOW - 2 * 86400.0)] * 2  # tried again
    assert "forgetting rate counts failed: ledger unreachable" in caplog.text
    assert lifespan.COUNTS_KEPT_S > 25 * 3600  # longer than any day, clock changes included
