"""The simulator's web app: `create_simulator_app(settings)` builds it.

POST /v1/images/generations | edits | variations   the simulated OpenAI API
POST /v1/responses (also ?beta=true)               the Responses API, image_generation tool
GET | DELETE /v1/responses/{id}, POST …/cancel, GET …/input_items
POST | GET /v1/files, GET | DELETE /v1/files/{id}, GET …/content   the Files API
POST | GET /v1/batches, GET /v1/batches/{id}, POST …/cancel      image batches
GET  /v1/organization/costs                        costs built from the record
GET  /v1/models                                    the simulated models
GET  /_sim/billing    POST /_sim/reset             the billing record (reset: and arrivals,
                                                   stored responses, files, batches)
GET  /_sim/arrivals                                every request received, as sent
GET  /_sim/config     POST /_sim/config            runtime knobs (latency, payload, fault,
                                                   extra answer headers, batch delay and
                                                   completion window, how long a batch
                                                   create reads its file, how long a
                                                   background response runs at least,
                                                   data residency)
GET  /healthz
"""

from __future__ import annotations

import json
import time
from functools import partial

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.core.models import Endpoint
from proxy.simulator.answers import models_page
from proxy.simulator.arrivals import Arrivals, Recorder
from proxy.simulator.batch_routes import (
    cancel_batch,
    create_batch,
    delete_file,
    file_content,
    list_batches,
    list_files,
    retrieve_batch,
    retrieve_file,
    upload_file,
)
from proxy.simulator.catalogue import MODELS
from proxy.simulator.costs import CostsQueryError, costs_page
from proxy.simulator.faults import ECHO_HEADER, echo, echoed
from proxy.simulator.options import Knobs, SimulatorSettings
from proxy.simulator.refusals import ApiError, invalid, invalid_api_key
from proxy.simulator.response_routes import (
    cancel_response,
    count_input_tokens,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from proxy.simulator.routes import SimulatorState, error_response, handle_image_request

__all__ = ["SimulatorSettings", "create_simulator_app"]

DEFAULT_SETTINGS = SimulatorSettings()


def create_simulator_app(settings: SimulatorSettings = DEFAULT_SETTINGS) -> Starlette:
    """A fresh simulator with its own knobs, billing record and record of arrivals."""
    state = SimulatorState(Knobs.of(settings), settings.api_key)
    arrivals = Arrivals()
    return Starlette(
        routes=_Endpoints(state, arrivals).routes(),
        middleware=[Middleware(Recorder, arrivals=arrivals, knobs=lambda: state.knobs)],
    )


class _Endpoints:
    """The simulator's endpoints, over one state and one record of arrivals."""

    def __init__(self, state: SimulatorState, arrivals: Arrivals) -> None:
        self.state = state
        self.arrivals = arrivals

    def routes(self) -> list[Route]:
        return [
            Route("/v1/images/generations", partial(self.images, "generations"), methods=["POST"]),
            Route("/v1/images/edits", partial(self.images, "edits"), methods=["POST"]),
            Route("/v1/images/variations", partial(self.images, "variations"), methods=["POST"]),
            Route("/v1/responses", partial(create_response, self.state), methods=["POST"]),
            Route(
                "/v1/responses/input_tokens",
                partial(count_input_tokens, self.state),
                methods=["POST"],
            ),
            Route(
                "/v1/responses/{response_id}",
                partial(retrieve_response, self.state),
                methods=["GET"],
            ),
            Route(
                "/v1/responses/{response_id}",
                partial(delete_response, self.state),
                methods=["DELETE"],
            ),
            Route(
                "/v1/responses/{response_id}/cancel",
                partial(cancel_response, self.state),
                methods=["POST"],
            ),
            Route(
                "/v1/responses/{response_id}/input_items",
                partial(list_input_items, self.state),
                methods=["GET"],
            ),
            Route("/v1/files", partial(upload_file, self.state), methods=["POST"]),
            Route("/v1/files", partial(list_files, self.state), methods=["GET"]),
            Route("/v1/files/{file_id}", partial(retrieve_file, self.state), methods=["GET"]),
            Route("/v1/files/{file_id}", partial(delete_file, self.state), methods=["DELETE"]),
            Route(
                "/v1/files/{file_id}/content", partial(file_content, self.state), methods=["GET"]
            ),
            Route("/v1/batches", partial(create_batch, self.state), methods=["POST"]),
            Route("/v1/batches", partial(list_batches, self.state), methods=["GET"]),
            Route("/v1/batches/{batch_id}", partial(retrieve_batch, self.state), methods=["GET"]),
            Route(
                "/v1/batches/{batch_id}/cancel",
                partial(cancel_batch, self.state),
                methods=["POST"],
            ),
            Route("/v1/organization/costs", self.costs, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/_sim/config", self.get_config, methods=["GET"]),
            Route("/_sim/config", self.set_config, methods=["POST"]),
            Route("/_sim/billing", self.billing, methods=["GET"]),
            Route("/_sim/arrivals", self.arrived, methods=["GET"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route(
                "/v1/{path:path}", self.not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]
            ),
        ]

    async def images(self, endpoint: Endpoint, request: Request) -> Response:
        return await handle_image_request(self.state, endpoint, request)

    async def get_config(self, request: Request) -> Response:
        return JSONResponse(self.state.knobs.to_json())

    async def set_config(self, request: Request) -> Response:
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            self.state.knobs = self.state.knobs.updated(changes)
        except ValueError as exc:
            return error_response(invalid(str(exc), param=None), "req_sim_config")
        return JSONResponse(self.state.knobs.to_json())

    async def billing(self, request: Request) -> Response:
        self.state.settle(time.time())
        return JSONResponse(self.state.record.to_json())

    async def arrived(self, request: Request) -> Response:
        return JSONResponse(self.arrivals.to_json())

    async def reset(self, request: Request) -> Response:
        self.state.clear()
        self.arrivals.clear()
        return JSONResponse({"status": "ok"})

    async def costs(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        if not self.state.admits(authorization):
            return error_response(invalid_api_key(authorization), "req_sim_costs")
        self.state.settle(time.time())
        try:
            page = costs_page(self.state.record.entries(), request.query_params, now=time.time())
        except CostsQueryError as exc:
            return error_response(invalid(str(exc), param=exc.param), "req_sim_costs")
        return JSONResponse(page)

    async def models(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        echoes = self.state.knobs.fault == "echo"
        if not self.state.admits(authorization):
            error = invalid_api_key(authorization)
            if echoes:
                error = echoed(error, authorization)
            return error_response(error, "req_sim_models")
        page = models_page(list(MODELS))
        if not echoes:
            return JSONResponse(page)
        page["echo"] = echo(authorization)
        return JSONResponse(page, headers={ECHO_HEADER: authorization or ""})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(self, request: Request) -> Response:
        error = ApiError(
            404, f"Invalid URL ({request.method} {request.url.path})", param=None, code=None
        )
        return error_response(error, "req_sim_not_found")
