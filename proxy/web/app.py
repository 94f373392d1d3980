"""create_app(): the routes, wired to what they share."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.core.errors import LedgerError
from proxy.core.models import IMAGES_ENDPOINTS
from proxy.core.settings import Config
from proxy.doors import ImagesDoor, ResponsesDoor
from proxy.metrics import Metrics
from proxy.web.admin import AdminApi
from proxy.web.admission import BodyBudget
from proxy.web.batches import Batches
from proxy.web.files import Files
from proxy.web.gateway import Gateway, Handler
from proxy.web.lifespan import Lifespan
from proxy.web.passthrough import OtherPaths
from proxy.web.pipeline import Pipeline
from proxy.web.reload import Reloader
from proxy.web.response_objects import InputTokens, ResponseObjects, websocket_refused
from proxy.web.responses import EXCEPTION_HANDLERS
from proxy.web.runtime import Overrides, Runtime, upstream_key
from proxy.web.scrape import Scrapes
from proxy.web.self_service import BUDGET_PATH, SelfService

log = logging.getLogger("tollgate")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


def create_app(
    config: Config,
    overrides: Overrides | None = None,
    source: Path | None = None,
    *,
    metrics_dir: Path | None = None,
    replace_workers: Callable[[], Awaitable[None]] | None = None,
    settle_heap: bool = False,
) -> Gateway:
    """The Tollgate ASGI app for `config` (read from `source`, which a reload reads again);
    the ledger and upstream open with the app.

    `metrics_dir`: where the workers of a multi-worker server keep their metric values;
    `replace_workers`: how a reload has a multi-worker server replace its workers, each of
    which reads the files (`proxy.web.reload.Reloader`); `settle_heap`: the app is its
    process's server (`proxy.web.heap`), not one of a test's. A missing upstream key is a
    ConfigError here, before anything opens."""
    overrides = overrides or Overrides()
    upstream_key(config, overrides)
    metrics = Metrics(multiprocess_dir=str(metrics_dir) if metrics_dir else None)
    doors: dict[str, Handler] = {
        f"/v1/images/{e}": Pipeline(ImagesDoor(e)) for e in IMAGES_ENDPOINTS
    }
    doors["/v1/responses"] = Pipeline(ResponsesDoor())
    gateway = Gateway(Starlette(), doors, BodyBudget(config.limits, metrics), metrics)
    reloader = Reloader(gateway, source, overrides, replace_workers)
    admin, other_paths, bind = AdminApi(reloader), OtherPaths(), gateway.bind
    responses, files, batches = ResponseObjects(), Files(), Batches()
    input_tokens = InputTokens()
    self_service, scrapes = SelfService(), Scrapes()
    routes = [
        Route("/metrics", bind(scrapes.metrics), methods=["GET"]),
        Route("/admin/budgets", bind(admin.budgets), methods=["GET"]),
        Route("/admin/report", bind(admin.report), methods=["GET"]),
        Route("/admin/reload", bind(admin.reload), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", bind(readyz), methods=["GET"]),
        Route("/v1/responses", bind(websocket_refused), methods=["GET"]),
        Route("/v1/responses/input_tokens", bind(input_tokens.handle), methods=["POST"]),
        Route("/v1/responses/{response_id}", bind(responses.handle), methods=["GET", "DELETE"]),
        Route("/v1/responses/{response_id}/input_items", bind(responses.handle), methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", bind(responses.handle), methods=["POST"]),
        Route("/v1/files", bind(files.upload), methods=["POST"]),
        Route("/v1/files", bind(files.listing), methods=["GET"]),
        Route("/v1/files/{file_id}", bind(files.one), methods=["GET", "DELETE"]),
        Route("/v1/files/{file_id}/content", bind(files.one), methods=["GET"]),
        Route("/v1/batches", bind(batches.create), methods=["POST"]),
        Route("/v1/batches", bind(batches.listing), methods=["GET"]),
        Route("/v1/batches/{batch_id}", bind(batches.one), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", bind(batches.one), methods=["POST"]),
        # Every method, so that none reaches the passthrough below: GET answers, others 405.
        Route(BUDGET_PATH, bind(self_service.budget), methods=ALL_METHODS),
        # Every standard method: OtherPaths answers each one in OpenAI's way (404, unless a
        # `passthrough:` prefix forwards it); starlette's 405 is left for made-up methods.
        Route("/v1/{path:path}", bind(other_paths.handle), methods=ALL_METHODS),
    ]
    app = Starlette(
        routes=routes,
        lifespan=Lifespan(gateway, config, overrides, reloader, settle_heap),
        exception_handlers=EXCEPTION_HANDLERS,
    )
    # No redirect to the path with a slash added or removed: it would be built from the
    # client's Host header, and lead only to a path `Gateway` refuses (`/v1/`).
    app.router.redirect_slashes = False
    gateway.app = app
    gateway.on_replaced = reloader.replaced
    return gateway


async def healthz(request: Request) -> Response:
    """The process answers."""
    return JSONResponse({"status": "ok"})


READY_REASONS = ("ledger writes failing", "ledger unreachable")
"""What `/readyz` may say of a ledger that is not ready: it needs no token, so never the
error itself, which names the database's host, port, user or file (that goes to the log)."""


async def readyz(request: Request, runtime: Runtime) -> Response:
    """The process answers and reaches its ledger."""
    try:
        await runtime.ledger.ping()
    except LedgerError as exc:
        log.warning("not ready: %s", exc)
        return JSONResponse({"status": "unavailable", "reason": reason(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


def reason(exc: LedgerError) -> str:
    """The kind of ledger failure `exc` is, one of `READY_REASONS`."""
    text = str(exc)
    return next((r for r in READY_REASONS if text.startswith(r)), "ledger unreachable")
