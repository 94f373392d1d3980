"""What the request path shares, built at start-up and passed in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.alerts import Alerts
from proxy.config import Config
from proxy.ledger import Ledger
from proxy.metrics import Metrics
from proxy.upstream import Upstream


@dataclass
class Services:
    """What the request path needs, built at start-up and passed in."""

    config: Config
    ledger: Ledger
    upstream: Upstream
    metrics: Metrics
    alerts: Alerts
    clock: Callable[[], float] = time.time
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    background_handles: list[asyncio.TimerHandle] = field(default_factory=list)
