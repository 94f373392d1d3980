"""create_app(): the routes, the start-up and shutdown of what they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.config import load_config
from proxy.core.errors import (
    ConfigError,
    LedgerError,
    NotFound,
    Overloaded,
    ServiceUnavailable,
    UnsupportedEncoding,
)
from proxy.core.models import ENDPOINTS
from proxy.core.paths import canonical
from proxy.core.settings import Config, UpstreamSettings
from proxy.finance.alerts import Alerts
from proxy.finance.status import budget_status
from proxy.ledger import open_ledger
from proxy.logs import ENV_LOG_LEVEL, configure_logging
from proxy.metrics import ENV_MULTIPROC_DIR, Metrics
from proxy.upstream import Upstream
from proxy.web import housekeeping
from proxy.web.admin import AdminApi
from proxy.web.admission import BodyBudget
from proxy.web.connections import OVER_CAPACITY
from proxy.web.handlers import ImagesHandler, OtherPaths
from proxy.web.responses import EXCEPTION_HANDLERS, as_request_error, error_response
from proxy.web.runtime import Runtime, Tasks

log = logging.getLogger("tollgate")

# How `tollgate serve` hands its choices to uvicorn's worker processes.
ENV_CONFIG = "TOLLGATE_CONFIG"
ENV_LEDGER = "TOLLGATE_LEDGER"
ENV_UPSTREAM_URL = "TOLLGATE_UPSTREAM_URL"
ENV_UPSTREAM_KEY = "TOLLGATE_UPSTREAM_KEY"
ENV_WORKERS = "TOLLGATE_WORKERS"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
# Answered even on a connection past `limits.max_connections`: the probes must tell a busy
# process from a dead one, and a saturated process is when its metrics matter most.
ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})


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


class Gateway:
    """The ASGI entry: every path is made canonical first, then image requests go straight
    to their handler, the rest to starlette.

    A path that is not canonical (see `proxy.core.paths`) is refused here, before any route or
    `passthrough:` prefix is matched against it, so what is matched is what is forwarded.
    A body with a content coding is refused too: Tollgate prices the body it reads.
    The image endpoints are the request path, and starlette's router and middleware
    (error pages, exception handlers, path matching) had nothing to do for them but cost
    CPU on every request. A fault of Tollgate's own still gets an answer, a 500 in OpenAI's
    error shape, with the traceback in the log.

    Every request's body charge (`proxy.web.admission`) is given back here, in one `finally`,
    and a request on a connection past `limits.max_connections` is answered 503 here.
    """

    def __init__(
        self,
        app: ASGIApp,
        images: dict[str, ImagesHandler],
        bodies: BodyBudget,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.images = images
        self.bodies = bodies
        self.metrics = metrics
        self.runtime: Runtime | None = None
        """The runtime in force (None until the app has started): replaced whole on reload;
        each request reads it once, when it arrives."""

    def current(self) -> Runtime:
        if self.runtime is None:
            raise ServiceUnavailable("Tollgate is starting; retry shortly.")
        return self.runtime

    def bind(
        self, endpoint: Callable[[Request, Runtime], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A starlette endpoint that calls `endpoint` with the runtime in force."""

        async def bound(request: Request) -> Response:
            return await endpoint(request, self.current())

        return bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if OVER_CAPACITY in scope and scope["path"] not in ALWAYS_ANSWERED:
            await self.over_capacity(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        path = canonical(raw)
        refusal = refused(scope, raw) if path is None else encoding_refusal(scope["headers"])
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        assert path is not None
        handler = self.images.get(path)
        if handler is None or scope["method"] != "POST":
            if path != scope["path"]:
                scope = {**scope, "path": path}
            try:
                await self.app(scope, receive, send)
            finally:
                self.bodies.release(scope)
            return
        try:
            response = await handler.handle(Request(scope, receive), self.current())
        except Exception as exc:
            response = error_response(as_request_error(exc, scope["method"], path))
        finally:
            # The body and its parsed copies are dropped with the handler's frame; the answer
            # (spooled, or streamed from upstream) no longer needs them.
            self.bodies.release(scope)
        await response(scope, receive, send)

    async def over_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every connection the process may hold is busy: this one is answered and closed."""
        self.metrics.refused("connections")
        refusal = Overloaded(
            "Tollgate is serving as many connections as it safely can; retry in a moment."
        )
        await error_response(refusal, {"connection": "close"})(scope, receive, send)


def refused(scope: Scope, raw: bytes) -> NotFound:
    """The answer to a path that is not canonical: it names no endpoint."""
    shown = raw.decode("ascii", "backslashreplace")
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return NotFound(
        f"Invalid URL ({scope['method']} {shown}): Tollgate accepts only plain paths (no '.' "
        "or '..' segments, empty segments, encoded '/' or '%', backslashes or control "
        "characters)."
    )


def encoding_refusal(headers: list[tuple[bytes, bytes]]) -> UnsupportedEncoding | None:
    """A refusal when the body comes with a content coding other than identity."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() != b"identity":
            return UnsupportedEncoding(
                f"Content-Encoding {value.decode('latin-1')!r} is not accepted: Tollgate reads "
                "and prices the request body itself, so send it uncompressed."
            )
    return None


def create_app(
    config: Config, overrides: Overrides = Overrides(), source: Path | None = None
) -> Gateway:
    """The Tollgate ASGI app for `config` (read from `source`, which a reload reads again);
    the ledger and upstream open with the app."""
    upstream_settings = config.upstream
    api_key = overrides.upstream_key or upstream_settings.api_key
    if not api_key:
        raise ConfigError(
            [
                f"{config.root}: upstream.api_key is not set: set OPENAI_API_KEY (or run with "
                "--simulate to use the built-in simulated upstream)"
            ]
        )
    # Set by `tollgate serve --workers N` before the workers import prometheus-client.
    metrics = Metrics(multiprocess_dir=os.environ.get(ENV_MULTIPROC_DIR) or None)
    bodies = BodyBudget(config.limits, metrics)
    tasks = Tasks()

    def build_upstream(settings: UpstreamSettings) -> Upstream:
        return Upstream(
            overrides.upstream_url or settings.base_url,
            overrides.upstream_key or settings.api_key or api_key,
            timeout_s=settings.timeout_s,
            max_connections=settings.max_connections,
            organization=settings.organization,
            project=settings.project,
            transport=overrides.transport,
        )

    async def reload() -> Config:
        """Read the configuration again; a ConfigError leaves the current one in force."""
        if source is None:
            raise ConfigError(["<memory>:1: this Tollgate was not started from a file"])
        try:
            fresh = load_config(source)
        except ConfigError as exc:
            log.error("configuration reload refused: %s", "; ".join(exc.problems))
            raise
        old = gateway.current()
        upstream = old.upstream
        if fresh.upstream != old.config.upstream:
            upstream = build_upstream(fresh.upstream)
            # Requests in flight keep the old client until they are done: by their deadline.
            tasks.later(old.config.upstream.deadline_s + 5, old.upstream.aclose)
        bodies.configure(fresh.limits)
        old.alerts.config = fresh
        gateway.runtime = replace(old, config=fresh, upstream=upstream)
        log.info("configuration reloaded from %s (%d teams)", source, len(fresh.teams))
        if os.environ.get(ENV_WORKERS, "1") != "1":
            # Several workers: the supervisor replaces each one, which reads the new files.
            os.kill(os.getppid(), signal.SIGHUP)
        return fresh

    def reload_on_signal() -> None:
        async def run() -> None:
            with contextlib.suppress(ConfigError):
                await reload()

        tasks.spawn(run())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ledger = await open_ledger(overrides.ledger_url or config.ledger_url)
        clock = overrides.clock or time.time
        alerts = Alerts(config, ledger, clock)
        runtime = Runtime(
            config=config,
            ledger=ledger,
            upstream=build_upstream(upstream_settings),
            metrics=metrics,
            alerts=alerts,
            bodies=bodies,
            tasks=tasks,
            clock=clock,
        )
        gateway.runtime = runtime
        me = housekeeping.this_process()
        await ledger.register(me, clock())
        await housekeeping.reclaim_once(
            ledger, me, clock(), housekeeping.reclaim_after_s(upstream_settings)
        )
        alerts.start()
        duties = asyncio.create_task(
            housekeeping.run(
                ledger,
                me,
                clock,
                lambda: housekeeping.reclaim_after_s(gateway.current().config.upstream),
            )
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
        try:
            yield
        finally:
            duties.cancel()
            last = gateway.current()
            # In-flight exchanges are being billed: let them finish and settle. Each ends by
            # its deadline, then settles within `timeout_s` (a ledger outage's retries).
            upstream_now = last.config.upstream
            await tasks.finish(upstream_now.deadline_s + upstream_now.timeout_s)
            await last.upstream.aclose()
            await alerts.aclose()
            metrics.close()
            await ledger.unregister()
            await ledger.close()

    images = {f"/v1/images/{e}": ImagesHandler(e) for e in ENDPOINTS}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request, runtime: Runtime) -> Response:
        try:
            await runtime.ledger.ping()
        except LedgerError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(request: Request, runtime: Runtime) -> Response:
        try:
            budgets = await budget_status(runtime.config, runtime.ledger, runtime.clock())
        except LedgerError as exc:
            log.error("budget gauges left out of this scrape: %s", exc)
            budgets = []
        return Response(metrics.exposition(budgets), media_type=CONTENT_TYPE_LATEST)

    admin = AdminApi(reload)
    other_paths = OtherPaths()
    gateway = Gateway(Starlette(), images, bodies, metrics)
    bind = gateway.bind
    routes = [
        Route("/metrics", bind(metrics_endpoint), methods=["GET"]),
        Route("/admin/budgets", bind(admin.budgets), methods=["GET"]),
        Route("/admin/report", bind(admin.report), methods=["GET"]),
        Route("/admin/reload", bind(admin.reload), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", bind(readyz), methods=["GET"]),
        # Every standard method: OtherPaths answers each one in OpenAI's way (404, unless a
        # `passthrough:` prefix forwards it); starlette's 405 is left for made-up methods.
        Route("/v1/{path:path}", bind(other_paths.handle), methods=ALL_METHODS),
    ]
    gateway.app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    return gateway


def app_from_env() -> Gateway:
    """The app factory uvicorn's worker processes call (`tollgate serve --workers N`)."""
    configure_logging(os.environ.get(ENV_LOG_LEVEL, "info"))
    source = Path(os.environ.get(ENV_CONFIG, "policies"))
    return create_app(
        load_config(source),
        Overrides(
            ledger_url=os.environ.get(ENV_LEDGER) or None,
            upstream_url=os.environ.get(ENV_UPSTREAM_URL) or None,
            upstream_key=os.environ.get(ENV_UPSTREAM_KEY) or None,
        ),
        source,
    )
