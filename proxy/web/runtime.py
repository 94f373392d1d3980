"""What the request path works with, built at start-up and passed in.

A `Runtime` is one consistent set of dependencies: the configuration and what was
built from it. A reload builds a new one and swaps it in whole; a request reads it
once, when it arrives, and keeps that one to its end, so a request never sees the
configuration of one generation with the upstream client of another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.core.settings import Config
from proxy.finance.alerts import Alerts
from proxy.ledger import Ledger
from proxy.metrics import Metrics
from proxy.upstream import Upstream
from proxy.web.admission import BodyBudget

T = TypeVar("T")


class Tasks:
    """Work that must finish whatever the client does (metering), shared by every
    generation of the runtime, and awaited at shutdown."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[Any]] = set()
        self.timers: list[asyncio.TimerHandle] = []

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task of its own, kept until it is done."""
        task = asyncio.create_task(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    def later(self, delay_s: float, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Start `work` in `delay_s` seconds, unless shutdown comes first."""
        loop = asyncio.get_running_loop()
        self.timers.append(loop.call_later(delay_s, lambda: self.spawn(work())))

    async def finish(self, timeout_s: float) -> None:
        """Cancel the timers and wait up to `timeout_s` for the running work."""
        for timer in self.timers:
            timer.cancel()
        if self.running:
            await asyncio.wait(set(self.running), timeout=timeout_s)


@dataclass(frozen=True, slots=True)
class Runtime:
    """One generation of what the request path needs."""

    config: Config
    ledger: Ledger
    upstream: Upstream
    metrics: Metrics
    alerts: Alerts
    bodies: BodyBudget
    """Request-body bytes held in memory, against `limits.inflight_bytes`."""
    tasks: Tasks = field(default_factory=Tasks)
    clock: Callable[[], float] = time.time
    """Unix time for budgets and the ledger (tests move it)."""

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return self.tasks.spawn(work)
