"""Reload: read the configuration again and swap in the runtime built from it, or refuse
it and keep the one in force. Asked for by `POST /admin/reload` or SIGHUP.

The files are read and checked on a thread (1,000 team files take a fifth of a second),
so that the event loop goes on serving meanwhile; one reload at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from proxy.config import load_config
from proxy.core.errors import ConfigError
from proxy.core.settings import Config
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides, next_runtime

log = logging.getLogger("tollgate")


class Reloader:
    """Reloads the configuration of `gateway` from `source`.

    `after` is called once a reload has succeeded: a multi-worker server passes what asks
    its supervisor to replace every worker, each of which reads the new files."""

    def __init__(
        self,
        gateway: Gateway,
        source: Path | None,
        overrides: Overrides,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.source = source
        self.overrides = overrides
        self.after = after
        self._one_at_a_time = asyncio.Lock()

    async def __call__(self) -> Config:
        """Read the configuration again; a ConfigError leaves the current one in force."""
        if self.source is None:
            raise ConfigError(["<memory>:1: this Tollgate was not started from a file"])
        source = self.source
        try:
            async with self._one_at_a_time:
                fresh = await asyncio.to_thread(load_config, source)
                self.gateway.runtime = next_runtime(self.gateway.current(), fresh, self.overrides)
        except ConfigError as exc:
            log.error("configuration reload refused: %s", "; ".join(exc.problems))
            raise
        log.info("configuration reloaded from %s (%d teams)", self.source, len(fresh.teams))
        if self.after is not None:
            self.after()
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
