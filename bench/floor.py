"""The floor of this stack: starlette + Tollgate's upstream client (a pooled aiohttp
session), no Tollgate logic: what any proxy built on these libraries pays per request.

.venv/bin/python -m bench.floor --port 8081 --upstream http://127.0.0.1:8090/v1
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DROPPED = {"host", "content-length", "connection", "transfer-encoding", "content-encoding"}


def create_floor(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        if not sessions:  # made in the running loop, as Tollgate does
            sessions.append(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=4096),
                    auto_decompress=False,
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
            )
        return sessions[0]

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k not in DROPPED]
        path = request.url.path.removeprefix("/v1")
        answer = await session().post(upstream + path, data=await request.body(), headers=headers)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in DROPPED}
        if answer.content_type == "text/event-stream":
            # Streamed as it comes, as any proxy must: the client sees each event at once.
            return StreamingResponse(relay(answer), status_code=answer.status, headers=kept)
        async with answer:
            body = await answer.read()
        return Response(body, status_code=answer.status, headers=kept)

    async def relay(answer: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        async with answer:
            async for chunk in answer.content.iter_any():
                yield chunk

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/{path:path}", forward, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(create_floor(args.upstream), port=args.port, log_level="warning", access_log=False)
