"""The HTTP client to OpenAI (or the simulated upstream): one pooled httpx client.

httpx's API over the aiohttp transport (`httpx-aiohttp`, the pairing the openai
SDK offers): a third of the CPU of httpx's default transport per request. The
pool is sized for thousands of slow (20-60 s) generations in flight. Transport
errors are translated here, at the boundary, into Tollgate's own errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from proxy.errors import UpstreamTimeout, UpstreamUnavailable

# Never sent upstream: hop-by-hop headers, the client's credentials and framing
# (recomputed for the body actually sent), and what Tollgate replaces.
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "content-length",
        "content-type",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "openai-organization",
        "openai-project",
        "accept-encoding",
        "expect",
    }
)
# Never passed back to the client: framing that Tollgate recomputes.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
    }
)


class Upstream:
    """Sends image requests to the upstream with the company's key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 300.0,
        max_connections: int = 4096,
        organization: str | None = None,
        project: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = f"Bearer {api_key}"
        self._organization = organization
        self._project = project
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=512)
        # Requests go straight to the transport: an httpx Client's layers (auth, redirects,
        # cookies, event hooks) have nothing to do for a proxy and cost CPU on every request;
        # a client-wide cookie jar would even carry one team's upstream cookies to another.
        self._transport = transport or AiohttpTransport(limits=limits)
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)).as_dict()

    def headers(
        self, client_headers: Iterable[tuple[str, str]], content_type: str
    ) -> list[tuple[str, str]]:
        """The client's headers, less credentials and framing, plus the upstream's own."""
        out = [(k, v) for k, v in client_headers if k.lower() not in DROPPED_REQUEST_HEADERS]
        out += [("authorization", self._auth), ("content-type", content_type)]
        if self._organization:
            out.append(("openai-organization", self._organization))
        if self._project:
            out.append(("openai-project", self._project))
        return out

    async def send(
        self,
        path: str,
        body: bytes,
        content_type: str,
        client_headers: Iterable[tuple[str, str]],
        *,
        method: str = "POST",
        query: str = "",
    ) -> httpx.Response:
        """Send `body` to `path` (e.g. `/images/generations`); the answer is left unread."""
        url = self.base_url + path + (f"?{query}" if query else "")
        headers = self.headers(client_headers, content_type)
        if not body and not content_type:
            headers = [(k, v) for k, v in headers if k != "content-type"]
        request = httpx.Request(
            method, url, content=body or None, headers=headers,
            extensions={"timeout": self._timeout},
        )  # fmt: skip
        try:
            return await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise translate(exc) from exc

    async def aclose(self) -> None:
        await self._transport.aclose()


def translate(exc: BaseException) -> UpstreamTimeout | UpstreamUnavailable:
    """An httpx (or aiohttp) transport error as Tollgate's 502 or 504."""
    # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout: look at the cause.
    cause = exc.__cause__
    timed_out = isinstance(cause, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)) or (
        cause is None and isinstance(exc, httpx.TimeoutException)
    )
    if timed_out:
        return UpstreamTimeout("The upstream did not answer in time.")
    return UpstreamUnavailable(f"The upstream could not be reached: {type(exc).__name__}: {exc}")


def response_headers(upstream: httpx.Response) -> list[tuple[str, str]]:
    """Upstream headers to pass back (x-request-id, rate limits, content type)."""
    return [
        (k, v)
        for k, v in upstream.headers.multi_items()
        if k.lower() not in DROPPED_RESPONSE_HEADERS
    ]
