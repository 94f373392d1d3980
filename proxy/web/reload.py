"""Reload: read the configuration again and swap in the runtime built from it, or refuse
it and keep the one in force. Asked for by `POST /admin/reload` or SIGHUP.

The files are read and checked on a thread (1,000 team files take a fifth of a second),
so that the event loop goes on serving meanwhile; one reload at a time. With several
workers, the answer waits until every worker serves the new files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from proxy.config import load_config
from proxy.core.errors import ConfigError
from proxy.core.settings import Config
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides, check_next, next_runtime

log = logging.getLogger("tollgate")


class Reloader:
    """Reloads the configuration of `gateway` from `source`.

    `replace`: a multi-worker server passes what has its supervisor replace every worker
    by one that reads the files, and returns once they all serve (a ConfigError when the
    supervisor could not start them and kept the workers in force). This process then only
    checks the files, and keeps its configuration until it is replaced: had it taken the
    new one while a new worker failed to start, the workers would serve two configurations,
    and an answer given before the others were replaced let them serve the old one (a
    revoked key, a budget lowered) for as long as they took to be replaced."""

    def __init__(
        self,
        gateway: Gateway,
        source: Path | None,
        overrides: Overrides,
        replace: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.gateway = gateway
        self.source = source
        self.overrides = overrides
        self.replace = replace
        self._one_at_a_time = asyncio.Lock()

    async def __call__(self) -> Config:
        """Read the configuration again; a ConfigError leaves the current one in force."""
        if self.source is None:
            raise ConfigError(["<memory>:1: this Tollgate was not started from a file"])
        source = self.source
        try:
            async with self._one_at_a_time:
                fresh = await asyncio.to_thread(load_config, source)
                if self.replace is None:
                    current = self.gateway.current()
                    self.gateway.runtime = next_runtime(current, fresh, self.overrides)
                else:
                    check_next(self.gateway.current(), fresh, self.overrides)
                    await self.replace()
        except ConfigError as exc:
            log.error("configuration reload refused: %s", "; ".join(exc.problems))
            raise
        log.info("configuration reloaded from %s (%d teams)", self.source, len(fresh.teams))
        return fresh

    def on_signal(self) -> None:
        """Reload in a task of its own; a refusal is logged and changes nothing."""

        async def reload() -> None:
            with contextlib.suppress(ConfigError):
                await self()

        self.gateway.current().spawn(reload())


def reload_on_hangup(reloader: Reloader) -> None:
    """Reload on SIGHUP, where this event loop can take signals (not on Windows, nor off
    the main thread)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
