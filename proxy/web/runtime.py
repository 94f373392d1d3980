"""What the request path works with, built at start-up and passed in.

A `Runtime` is one consistent set of dependencies: the configuration and what was
built from it. A reload builds a new one (`next_runtime`) and swaps it in whole; a
request reads it once, when it arrives, and keeps that one to its end, so a request
never sees the configuration of one generation with the upstream client of another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import httpx

from proxy.core.errors import ConfigError
from proxy.core.settings import Config, UpstreamSettings
from proxy.finance.alerts import Alerts
from proxy.ledger import Ledger, open_ledger, redacted
from proxy.metrics import Metrics
from proxy.upstream import Upstream
from proxy.web.admission import BodyBudget
from proxy.web.follow import Followers
from proxy.web.spool import SpoolMemory

T = TypeVar("T")


@dataclass(frozen=True)
class Overrides:
    """Choices made on the command line that win over the configuration file."""

    ledger_url: str | None = None
    upstream_url: str | None = None
    upstream_key: str | None = None
    transport: httpx.AsyncBaseTransport | None = None
    """An in-process upstream (tests); None: the network, with aiohttp."""
    clock: Callable[[], float] | None = None
    """Unix time for budgets and the ledger (tests move it across period boundaries)."""


def upstream_key(config: Config, overrides: Overrides) -> str:
    """The key Tollgate sends upstream; a ConfigError when there is none."""
    key = overrides.upstream_key or config.upstream.api_key
    if not key:
        raise ConfigError(
            [
                f"{config.root}: upstream.api_key is not set: set OPENAI_API_KEY (or run with "
                "--simulate to use the built-in simulated upstream)"
            ]
        )
    return key


def build_upstream(config: Config, overrides: Overrides) -> Upstream:
    """The pooled client to the upstream `config` names (or the overrides do)."""
    settings: UpstreamSettings = config.upstream
    return Upstream(
        overrides.upstream_url or settings.base_url,
        upstream_key(config, overrides),
        timeout_s=settings.timeout_s,
        max_connections=settings.max_connections,
        organization=settings.organization,
        project=settings.project,
        transport=overrides.transport,
    )


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
    spools: SpoolMemory = field(default_factory=SpoolMemory)
    """Answers read whole before they are sent, held in memory (shared by every generation)."""
    tasks: Tasks = field(default_factory=Tasks)
    clock: Callable[[], float] = time.time
    """Unix time for budgets and the ledger (tests move it)."""
    followers: Followers = field(default_factory=Followers)
    """The background responses and batches this process follows (shared by every
    generation)."""
    in_force: Callable[[], Runtime] | None = None
    """The runtime in force now (the gateway's), which a reload may have replaced since a
    request took this one (shared by every generation)."""
    superseded: bool = False
    """This process is a worker that a reload replaced (`--workers N`) and that could not
    read the configuration in force in the workers that replaced it
    (`proxy.web.reload.Reloader.replaced`): no request may be admitted here any more
    (`proxy.web.in_force.identified_again`)."""

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return self.tasks.spawn(work)

    def newest(self) -> Runtime:
        """The runtime in force now: this one, or the one a reload swapped in since."""
        return self.in_force() if self.in_force is not None else self


async def open_runtime(
    config: Config, overrides: Overrides, metrics: Metrics, bodies: BodyBudget
) -> Runtime:
    """The first generation: the ledger opened, the upstream client and the alerts built."""
    ledger = await open_ledger(overrides.ledger_url or config.ledger_url)
    clock = overrides.clock or time.time
    upstream = build_upstream(config, overrides)
    upstream.open()
    return Runtime(
        config=config,
        ledger=ledger,
        upstream=upstream,
        metrics=metrics,
        alerts=Alerts(config, ledger, clock),
        bodies=bodies,
        tasks=Tasks(),
        clock=clock,
    )


RETIRE_AFTER_S = 5.0
"""How long past its deadline an old upstream client is kept for the requests it serves."""


def same_ledger(fresh: Config, overrides: Overrides, in_use: str) -> None:
    """Raise a ConfigError when `fresh` names another ledger than `in_use`, the one this
    Tollgate opened at start.

    A reload cannot move to another ledger: the spend and the reservations of the one in
    force would not count there, so every budget would start again from nothing (with
    several workers, each replaced one would reserve in the new ledger while the others
    still reserve in the old one: a hard limit passed twice). A `--ledger` on the command
    line wins over the file, whose `ledger` then changes nothing."""
    named = overrides.ledger_url or fresh.ledger_url
    if named != in_use:
        raise ConfigError(
            [
                f"{fresh.root}: ledger: changed from {redacted(in_use)} to {redacted(named)}: the "
                "ledger cannot change on a reload (the spend and reservations in the current "
                "one would not count there); restart Tollgate to use it (after `tollgate ledger "
                "copy`, to keep the spend)"
            ]
        )


def check_next(old: Runtime, fresh: Config, overrides: Overrides) -> None:
    """Raise the ConfigError `next_runtime(old, fresh, overrides)` would, changing nothing."""
    same_ledger(fresh, overrides, overrides.ledger_url or old.config.ledger_url)
    upstream_key(fresh, overrides)


def next_runtime(old: Runtime, fresh: Config, overrides: Overrides) -> Runtime:
    """The generation that follows `old` for the configuration `fresh`.

    The upstream client is built anew only when its settings changed; the old one is
    closed once every request that holds it has passed its deadline. The body budget and
    the alerts, shared by every generation, take the fresh limits and configuration.
    A ConfigError (another ledger, no upstream key) leaves everything as it was."""
    check_next(old, fresh, overrides)
    upstream = old.upstream
    if fresh.upstream != old.config.upstream:
        upstream = build_upstream(fresh, overrides)
        upstream.open()
        old.tasks.later(old.config.upstream.deadline_s + RETIRE_AFTER_S, old.upstream.aclose)
    old.bodies.configure(fresh.limits)
    old.alerts.config = fresh
    return replace(old, config=fresh, upstream=upstream)
