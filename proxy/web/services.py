"""What the request path shares, built at start-up and passed in."""

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


@dataclass
class Services:
    """What the request path needs, built at start-up and passed in."""

    config: Config
    ledger: Ledger
    upstream: Upstream
    metrics: Metrics
    alerts: Alerts
    bodies: BodyBudget
    """Request-body bytes held in memory, against `limits.inflight_bytes`."""
    clock: Callable[[], float] = time.time
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    """Work that must finish whatever the client does (metering); awaited at shutdown."""
    background_handles: list[asyncio.TimerHandle] = field(default_factory=list)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task of its own, kept until it is done."""
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
