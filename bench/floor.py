"""The floor of this stack: starlette + httpx over AiohttpTransport, no Tollgate logic.

.venv/bin/python -m bench.floor --port 8081 --upstream http://127.0.0.1:8090/v1
"""

from __future__ import annotations

import argparse

import httpx
import uvicorn
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DROPPED = {"host", "content-length", "connection", "transfer-encoding"}


def create_floor(upstream: str) -> Starlette:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), limits=limits)

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k not in DROPPED]
        answer = await client.post(
            upstream + "/images/generations", content=await request.body(), headers=headers
        )
        kept = {k: v for k, v in answer.headers.items() if k not in DROPPED | {"content-encoding"}}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/images/generations", forward, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(create_floor(args.upstream), port=args.port, log_level="warning", access_log=False)
