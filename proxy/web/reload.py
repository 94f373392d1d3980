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
from dataclasses import replace
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

    def replaced(self) -> None:
        """This worker was replaced by a reload (`--workers N`): the new configuration is in
        force in the workers that replaced it, and this one, draining, may still take a
        request (a body that came after, the next request on a connection kept alive). It
        reads the files too, and decides such a request under them, as a single worker does
        (`proxy.web.in_force.identified_again`); if it cannot (the files changed again
        meanwhile, and are invalid), it admits nothing more (`Runtime.superseded`: 503).

        Called by the event loop, which the signal that says so asks to (never in the
        signal handler, which may interrupt the loop anywhere), and read there, not on a
        thread: no request is decided under the old configuration meanwhile. A worker
        being retired may pause its streams that long (a fifth of a second for 1,000 team
        files)."""
        current = self.gateway.runtime
        if current is None:
            return
        try:
            if self.source is None:
                raise ConfigError(["<memory>:1: this Tollgate was not started from a file"])
            fresh = load_config(self.source)
            self.gateway.runtime = next_runtime(current, fresh, self.overrides)
        except Exception as exc:  # a callback of the loop: nothing may escape it
            problems = "; ".join(exc.problems) if isinstance(exc, ConfigError) else repr(exc)
            log.error(
                "replaced by a reload, this worker cannot read the configuration (%s): it "
                "admits no more requests (503, retried on a new connection)",
                problems,
            )
            self.gateway.runtime = replace(current, superseded=True)
            return
        log.info(
            "replaced by a reload: the requests this worker still takes are decided under "
            "the configuration it read again"
        )

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
