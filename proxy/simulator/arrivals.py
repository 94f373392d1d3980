"""Every request that reached the simulator, as it arrived on the wire, whatever its path.

The billing record holds only image requests; this one also shows a request that went
somewhere it should not have (a path another client would have read differently, an
admin page), so tests can check that what Tollgate forwards is exactly what it matched.
The knobs' extra answer headers are added here too, to every answer of the simulated API.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.simulator.options import Knobs

KEPT = 10_000
"""The most recent arrivals kept (a long test session sends many more)."""


@dataclass(frozen=True)
class Arrival:
    method: str
    raw_path: str
    """As sent, still percent-encoded."""
    query: str
    authorization: str | None
    project: str | None = None
    """The `OpenAI-Project` header: which project the request was made under."""
    headers: tuple[tuple[str, str], ...] = ()
    """Every header, as sent (so a test can tell what reached the upstream)."""


class Arrivals:
    """The most recent arrivals, oldest first (cleared by `POST /_sim/reset`)."""

    def __init__(self) -> None:
        self._kept: deque[Arrival] = deque(maxlen=KEPT)

    def append(self, arrival: Arrival) -> None:
        self._kept.append(arrival)

    def clear(self) -> None:
        self._kept.clear()

    def to_json(self) -> dict[str, Any]:
        return {"requests": [asdict(a) for a in self._kept]}


class Recorder:
    """ASGI middleware: records each request, and adds the knobs' `response_headers` to
    every answer outside `/_sim/`."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals, knobs: Callable[[], Knobs]) -> None:
        self.app = app
        self.arrivals = arrivals
        self.knobs = knobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        project = headers.get(b"openai-project")
        self.arrivals.append(
            Arrival(
                scope["method"],
                raw.decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"),
                authorization.decode("latin-1") if authorization is not None else None,
                project.decode("latin-1") if project is not None else None,
                tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
            )
        )
        extra = self.knobs().response_headers
        if not extra or raw.startswith(b"/_sim/"):
            await self.app(scope, receive, send)
            return

        async def send_with_extra(message: Message) -> None:
            if message["type"] == "http.response.start":
                added = [(k.encode(), v.encode()) for k, v in extra]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_extra)
