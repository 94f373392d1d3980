"""The HTTP client to OpenAI (or the simulated upstream): one pooled aiohttp session.

aiohttp's `ClientSession` is used directly: the httpx layer over it cost CPU on every
request (URL parsing, request and response objects, stream wrappers; README, "Benchmarks").
The pool is sized for thousands of slow (20-60 s) generations in flight.

What the request path sees is an `Answer` (`proxy.upstream.answer`), Tollgate's own view
of an upstream answer; client errors are translated here, at the boundary, into Tollgate's
`UpstreamTimeout` (504) and `UpstreamUnavailable` (502), both when sending and
while the body is read. Tests swap the network for an in-process httpx transport
(`transport=httpx.ASGITransport(app=simulator)`), which gives the same `Answer`.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any, BinaryIO, NoReturn, Protocol

import aiohttp
import httpx
import yarl
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.auth import bearer_token, carries_key, without_keys
from proxy.core.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.core.scrubbing import Scrubber
from proxy.upstream.answer import BROKEN_OFF, Answer
from proxy.upstream.key_errors import vetted

log = logging.getLogger("tollgate")

# The only client headers sent upstream: those OpenAI's SDKs send that change neither how
# the body is read nor whose account pays (openai-python: `_base_client.py` default and
# platform headers, `x-stainless-*` retry and timeout hints, `OpenAI-Beta` of the beta
# resources, the client's own request id). Not `Idempotency-Key`: every team shares the
# company key, so one team's key could replay another's answer. Everything else is
# dropped: credentials (the company key and the configured organization/project are
# Tollgate's), framing and content codings (recomputed for the body actually sent),
# hop-by-hop headers, and anything unknown.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "user-agent",
        "openai-beta",
        "x-client-request-id",
    }
)
FORWARDED_REQUEST_PREFIXES = ("x-stainless-",)
# The only upstream headers passed back to a client: what the SDKs read (the request id,
# rate limits, retry advice) and what describes the body. Never the upstream account's
# `openai-organization`/`openai-project`, cookies, server details, framing (Tollgate
# recomputes it), or anything unknown.
FORWARDED_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "content-disposition",
        "cache-control",
        "x-request-id",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    }
)
FORWARDED_RESPONSE_PREFIXES = ("x-ratelimit-",)
# Headers aiohttp would add that the client did not send.
NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Asked for on every request: an answer without Accept-Encoding may come in any content
# coding (RFC 9110, 12.5.3), and a compressed body is one the meters cannot read and the
# scrubber cannot search, which a client would decompress all the same (`Withheld`).
ACCEPT_ENCODING = ("accept-encoding", "identity")
KEEPALIVE_S = 5.0
CONNECT_S = 10.0
BODILESS_STATUSES = frozenset({204, 304})
"""Statuses whose answer has no body whatever its headers say (RFC 9112, 6.3), as the answer
to a HEAD has none: the upstream may not agree, and send one after it."""


Body = bytes | BinaryIO
"""What is sent: bytes, or a file read from its current position (a file upload spooled to
disk: aiohttp sends it with its length, never holding it whole)."""
FILE_CHUNK = 256 * 1024


class Client(Protocol):
    """The wire under `Upstream`: sends one request and returns its answer unread."""

    def open(self) -> None:
        """Make the connection pool now (in the running event loop)."""

    async def fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], body: Body
    ) -> Answer: ...

    async def aclose(self) -> None: ...


class ScrubbedAnswer:
    """An `Answer` with the upstream key masked in its headers and body.

    Wrapped where every answer comes from, so that no way of relaying one (spooled,
    streamed, an error passed through, a passthrough path) can forget it, and the
    meters read what the team receives.
    """

    def __init__(self, answer: Answer, scrubber: Scrubber) -> None:
        self.status = answer.status
        pairs = scrubber.pairs(answer.headers.items())
        self.headers = answer.headers if pairs is None else CIMultiDictProxy(CIMultiDict(pairs))
        self._answer = answer
        self._scrubber = scrubber

    async def chunks(self) -> AsyncIterator[bytes]:
        stream = self._scrubber.stream()
        try:
            async for chunk in self._answer.chunks():
                if out := stream.feed(chunk):
                    yield out
        except BROKEN_OFF as exc:
            failed(exc, self._scrubber)
            raise
        if rest := stream.finish():
            yield rest

    async def aclose(self) -> None:
        await self._answer.aclose()


def scrub_message(exc: UpstreamTimeout | UpstreamUnavailable, scrubber: Scrubber) -> None:
    """Mask the key in `exc`'s message, which reaches the team, and in its detail, which
    the log shows (`failed`): the HTTP parser quotes the malformed line it stopped at, and
    that line may be an echo of the key."""
    exc.message = scrubber.text(exc.message)
    exc.args = (exc.message,)
    if exc.detail is not None:
        exc.detail = scrubber.text(exc.detail)


def failed(exc: UpstreamTimeout | UpstreamUnavailable, scrubber: Scrubber) -> None:
    """Scrub `exc` (`scrub_message`), and log what the HTTP client said of the failure (its
    `detail`): the team's answer does not say it, since it names the upstream's host, port
    and URL (an egress proxy's, a gateway's), which are the operators' to know."""
    scrub_message(exc, scrubber)
    if exc.detail is not None:
        log.warning("upstream exchange failed (%s): %s", exc.code, exc.detail)


CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
"""Characters no header value may hold (uvicorn refuses to send one that does)."""


def field_values(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str] | None:
    """The headers with every value as the bytes it came in, read as Latin-1, and without
    those holding a control character; None when every header already is so (the usual
    case: one search over them all).

    aiohttp reads a header as UTF-8 and keeps a byte that is not as a lone surrogate, which
    no later write accepts: an `x-request-id` of such bytes failed the ledger's settlement
    and a forwarded one the answer, each a 500 after the upstream billed."""
    joined = "\t".join(headers.values())  # a tab: allowed in a value
    if joined.isascii() and CONTROL.search(joined) is None:
        return None
    values = (
        (k, v.encode("utf-8", "surrogateescape").decode("latin-1")) for k, v in headers.items()
    )
    return CIMultiDictProxy(CIMultiDict((k, v) for k, v in values if CONTROL.search(v) is None))


class Reheaded:
    """An answer with other headers (`field_values`)."""

    def __init__(self, answer: Answer, headers: CIMultiDictProxy[str]) -> None:
        self.status = answer.status
        self.headers = headers
        self._answer = answer

    def chunks(self) -> AsyncIterator[bytes]:
        return self._answer.chunks()

    async def aclose(self) -> None:
        await self._answer.aclose()


NOT_CODED = frozenset({"", "identity", "chunked"})
"""What leaves a body as it is: no coding, and the framing the HTTP client takes off."""


def content_coding(headers: CIMultiDictProxy[str]) -> str | None:
    """The coding of an answer's body once the HTTP client has read it: its
    `Content-Encoding`, and any `Transfer-Encoding` but `chunked` (which the client takes
    off; Tollgate sends no `TE`, so no other may be used, yet one would be left on);
    None when there is none."""
    named = (
        c.strip()
        for name in ("content-encoding", "transfer-encoding")
        for value in headers.getall(name, ())
        for c in value.split(",")
    )
    found = [c for c in named if c.lower() not in NOT_CODED]
    return ", ".join(found) or None


async def withheld(answer: Answer, coding: str, scrubber: Scrubber) -> Answer:
    """An answer in a content coding Tollgate did not ask for (it asks for `identity`): its
    body is never passed on, since the key could be in it where no search finds it and the
    client would decode it. An error answer comes without its body (`Withheld`: its status
    and headers pass, nothing was billed); a success cannot be read, and may have been
    billed: UpstreamUnavailable."""
    if not 200 <= answer.status < 300:
        return Withheld(answer)
    await answer.aclose()
    exc = UpstreamUnavailable(
        f"The upstream answered {answer.status} in content coding {coding!r}, which Tollgate "
        "did not ask for and does not read.",
        maybe_billed=True,
    )
    scrub_message(exc, scrubber)
    raise exc


FINAL_STATUSES = range(200, 600)
"""The statuses of an answer that can be read and passed on: 2xx to 5xx. The HTTP client
reads past the interim 1xx answers, but not past a 101 (an upgrade no request asked for);
a status line may also hold any three digits (`000`, `600`, `999`), which no HTTP server
can write back to a client."""


async def not_final(answer: Answer) -> NoReturn:
    """Refuse an answer whose status is not one of `FINAL_STATUSES`: neither a success that
    can be metered nor an error to pass on. Relayed, a 101 switched the team's connection to
    no protocol and a 600 broke off with nothing sent, each charged nothing. The request was
    sent, and what the upstream did with it is not known: UpstreamUnavailable, which may
    have been billed."""
    await answer.aclose()
    raise UpstreamUnavailable(
        f"The upstream answered with status {answer.status}, which is not a final HTTP "
        "answer Tollgate can read or pass on.",
        maybe_billed=True,
    )


class Withheld:
    """An upstream error answer whose body is left unread: its status and headers only."""

    def __init__(self, answer: Answer) -> None:
        self.status = answer.status
        self.headers = answer.headers
        self._answer = answer

    async def chunks(self) -> AsyncIterator[bytes]:
        return
        yield  # an async generator of nothing

    async def aclose(self) -> None:
        await self._answer.aclose()


class Upstream:
    """Sends image requests to the upstream with the company's key.

    `transport` is for tests: an httpx transport to an in-process upstream. Without it,
    requests go over the network with aiohttp.
    """

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
        # Per key: after a reload changes it, answers still in flight on the old
        # `Upstream` are scrubbed of the old key.
        self._scrubber = Scrubber.of_key(api_key)
        self._organization = organization
        self._project = project
        self._client: Client = (
            AiohttpClient(timeout_s, max_connections)
            if transport is None
            else HttpxClient(transport, timeout_s)
        )

    def open(self) -> None:
        """Make the client's connection pool, in the running event loop: its TLS context
        (the CA bundle read and parsed) and the HTTP client's modules cost about 60 ms,
        which the first request would otherwise wait for."""
        self._client.open()

    def headers(
        self,
        client_headers: Iterable[tuple[str, str]],
        content_type: str,
        project: str | None = None,
    ) -> list[tuple[str, str]]:
        """The client's headers that are safe to forward, plus the upstream's own: the
        OpenAI project is `project` (a team's), else the configured one. A header that
        carries the client's own key (`carries_key`) is left out, whatever its name."""
        # In lower case: aiohttp keeps a repeated header only if it is spelled alike.
        client = list(client_headers)
        out = allowed(client, FORWARDED_REQUEST_HEADERS, FORWARDED_REQUEST_PREFIXES)
        token = client_token(client)
        if token is not None:
            out = [(k, v) for k, v in out if not carries_key(v, token)]
        out.append(("authorization", self._auth))
        out.append(ACCEPT_ENCODING)
        if content_type:
            out.append(("content-type", content_type))
        if self._organization:
            out.append(("openai-organization", self._organization))
        project = project or self._project
        if project:
            out.append(("openai-project", project))
        return out

    async def send(
        self,
        path: str,
        body: Body,
        content_type: str,
        client_headers: Iterable[tuple[str, str]],
        *,
        method: str = "POST",
        query: str = "",
        project: str | None = None,
    ) -> Answer:
        """Send `body` to `path` (e.g. `/images/generations`); the answer is left unread,
        and the key is masked in whatever of it echoes the key (`ScrubbedAnswer`).

        `project` is the OpenAI project billed, on whose behalf objects (files, batches,
        responses) are created and read: a team's (`Config.project_of`); None sends the
        configured `upstream.project`.

        `path` and `query` must be canonical (`proxy.core.paths`): the URL is sent as built,
        never re-read by the HTTP client, so the upstream gets the path Tollgate matched."""
        # Every door strips a team key from the query it forwards (`query_of`); the
        # client's own is stripped here again, whatever path sends it.
        client = list(client_headers)
        token = client_token(client) if query else None
        if token is not None:
            query = without_keys(query, token)
        url = self.base_url + path + (f"?{query}" if query else "")
        try:
            answer = await self._client.fetch(
                method, url, self.headers(client, content_type, project), body
            )
        except BROKEN_OFF as exc:
            failed(exc, self._scrubber)
            raise
        if answer.status not in FINAL_STATUSES:
            await not_final(answer)
        fields = field_values(answer.headers)
        if fields is not None:
            answer = Reheaded(answer, fields)
        coding = content_coding(answer.headers)
        if coding is not None:
            answer = await withheld(answer, coding, self._scrubber)
        if answer.status >= 400:
            answer = await vetted(answer, self._scrubber)
        return ScrubbedAnswer(answer, self._scrubber) if self._scrubber else answer

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpClient:
    """One pooled aiohttp session, opened on first use (a session belongs to a running loop).

    Redirects are never followed, and no cookie is kept: one team's upstream cookies
    must never reach another team's requests.
    """

    def __init__(self, timeout_s: float, max_connections: int) -> None:
        self._max_connections = max_connections
        # As with httpx before: `connect` bounds the wait for a pooled connection, and an
        # upstream silent for `timeout_s` (before or during its answer) has timed out.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeout_s,
            sock_connect=min(timeout_s, CONNECT_S),
            sock_read=timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        if self._session is None:
            self._open()

    def _open(self) -> aiohttp.ClientSession:
        connector = FreshConnector(
            limit=self._max_connections,
            keepalive_timeout=KEEPALIVE_S,
            # The CA bundle httpx used (certifi, or SSL_CERT_FILE): slim images may have none.
            ssl=httpx.create_ssl_context(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            response_class=BodilessClosed,
            skip_auto_headers=NOT_ADDED,
        )
        return self._session

    async def fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], body: Body
    ) -> Answer:
        session = self._session or self._open()
        try:
            # Already encoded: yarl would otherwise remove dot-segments and re-quote.
            target = yarl.URL(url, encoded=True)
            response = await session.request(
                method, target, headers=headers, data=body or None, allow_redirects=False
            )
        # TimeoutError is an OSError; a ValueError is a request aiohttp would not write (a
        # header value with a control character), or an answer it could not read: not known
        # to have failed before sending, so counted as sent.
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise translate(exc) from exc
        return AiohttpAnswer(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class UnaskedAnswer(aiohttp.ClientConnectionError):
    """A new connection that held an answer before any request was written on it."""


class FreshConnector(aiohttp.TCPConnector):
    """A pool that never hands out a kept connection holding bytes no request asked for.

    An upstream that writes more than its answer's framing said (a body after a 204, a
    304 or the answer to a HEAD, a second answer after a whole one) leaves those bytes on
    the idle connection, where aiohttp reads them as an answer waiting to be taken: the
    next request sent on it, perhaps another team's, got that answer as its own, with its
    usage and its images. A connection that has received anything while idle (a parsed
    answer, bytes, an error: aiohttp's `should_close`) is closed, and another taken."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def connect(
        self, req: ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                if protocol is not None:
                    self._handed_out.add(protocol)
                return connection
            connection.close()
            if protocol not in self._handed_out:
                # A new connection on which the upstream spoke before it was asked.
                raise UnaskedAnswer("The upstream answered before it was sent a request.")


class BodilessClosed(aiohttp.ClientResponse):
    """A response whose connection is never kept when it is answered with no body (a 204, a
    304, the answer to a HEAD): whether the upstream sends one after it is not known, and one
    that came after the next request was written on it would be read as that request's answer.
    aiohttp gives such a connection back to its pool as soon as the head is read, so it is
    closed there, before anything else can take it."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        response = await super().start(connection)
        if protocol is not None and (self.status in BODILESS_STATUSES or self.method == "HEAD"):
            protocol.close()  # the pool drops a closed connection
        return response


class AiohttpAnswer:
    """An `Answer` read from an aiohttp response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise translate(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


class HttpxClient:
    """Requests through an httpx transport: the in-process upstream of tests."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_s: float) -> None:
        self._transport = transport
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_S)).as_dict()

    def open(self) -> None:
        pass  # the transport is the pool

    async def fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], body: Body
    ) -> Answer:
        content = (body or None) if isinstance(body, bytes) else _file_chunks(body)
        request = httpx.Request(
            method, url, content=content, headers=headers,
            extensions={"timeout": self._timeout},
        )  # fmt: skip
        try:
            response = await self._transport.handle_async_request(request)
        except (httpx.HTTPError, OSError) as exc:  # an ASGI upstream may raise socket errors
            raise translate(exc) from exc
        return HttpxAnswer(response)

    async def aclose(self) -> None:
        await self._transport.aclose()


async def _file_chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := file.read(FILE_CHUNK):
        yield chunk


class HttpxAnswer:
    """An `Answer` read from an httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = CIMultiDictProxy(CIMultiDict(response.headers.multi_items()))
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except (httpx.HTTPError, OSError) as exc:
            raise translate(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


# Failures before the request could leave: no connection was made (refused, DNS, TLS,
# the wait for a pooled connection or for the connect itself ran out). Nothing reached
# the upstream, so nothing can have been billed.
NEVER_SENT: tuple[type[Exception], ...] = (
    UnaskedAnswer,
    aiohttp.ClientConnectorError,  # refused, DNS (ClientConnectorDNSError), certificates
    aiohttp.ConnectionTimeoutError,  # `connect` / `sock_connect`: the pool wait included
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


def translate(exc: Exception) -> UpstreamTimeout | UpstreamUnavailable:
    """An aiohttp, httpx or socket error as Tollgate's 504 (too slow) or 502 (anything else).

    `maybe_billed` unless the error is one of `NEVER_SENT`: a reset, a disconnect or a
    silence after the request was written may come after OpenAI accepted the generation,
    which it bills whether or not its answer arrives. What is not known to have failed
    before sending counts as sent."""
    maybe_billed = not isinstance(exc, NEVER_SENT)
    kind = type(exc).__name__
    # What the HTTP client says names the upstream's host and port, or its URL: the log's.
    detail = f"{kind}: {exc}"
    # aiohttp's timeouts (ServerTimeoutError, ConnectionTimeoutError, SocketTimeoutError)
    # are all TimeoutErrors.
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return UpstreamTimeout(
            "The upstream did not answer in time.", maybe_billed=maybe_billed, detail=detail
        )
    return UpstreamUnavailable(
        f"The upstream could not be reached ({kind}).", maybe_billed=maybe_billed, detail=detail
    )


def response_headers(answer: Answer) -> list[tuple[str, str]]:
    """The upstream headers a client may see (x-request-id, rate limits, content type),
    named in lower case like Tollgate's own, which override them."""
    return allowed(answer.headers.items(), FORWARDED_RESPONSE_HEADERS, FORWARDED_RESPONSE_PREFIXES)


def client_token(client_headers: Iterable[tuple[str, str]]) -> str | None:
    """The bearer key of the client's `Authorization` header (never forwarded), if any."""
    for name, value in client_headers:
        if name.lower() == "authorization":
            return bearer_token(value)
    return None


def allowed(
    pairs: Iterable[tuple[str, str]], names: frozenset[str], prefixes: tuple[str, ...]
) -> list[tuple[str, str]]:
    """The headers of `pairs` an allow-list lets through (its `names`, or starting with one
    of its `prefixes`), named in lower case."""
    lowered = ((k.lower(), v) for k, v in pairs)
    return [(k, v) for k, v in lowered if k in names or k.startswith(prefixes)]
