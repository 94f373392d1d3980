"""What the simulator does to the client's connection: hang until it leaves, or cut it.

Uvicorn does not offer an ASGI way to drop a connection without an answer, so
`abort` reaches the transport behind uvicorn's `receive` callable. Under other
servers (or httpx's ASGITransport) it raises `ConnectionResetError` instead,
which the client sees as a failed request either way.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

DISCONNECT_GRACE_SECONDS = 1.0


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def hang(request: Request, seconds: float) -> bool:
    """Sleep up to `seconds`, ending early when the client goes; True if it went."""
    try:
        await asyncio.wait_for(wait_for_disconnect(request), seconds)
    except TimeoutError:
        return False
    return True


async def abort(request: Request) -> None:
    """Close the connection at once, without (the rest of) an HTTP answer."""
    server_cycle = getattr(request.receive, "__self__", None)
    transport = getattr(server_cycle, "transport", None)
    cut = getattr(transport, "abort", None)  # asyncio's and uvloop's transports alike
    if not callable(cut):
        raise ConnectionResetError("simulated connection reset")
    cut()
    # Let the server notice, so that whatever the app sends next is dropped quietly.
    await hang(request, DISCONNECT_GRACE_SECONDS)
