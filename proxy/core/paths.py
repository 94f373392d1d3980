"""Request paths in their one canonical form, decided before anything routes on them (pure).

A path is matched (image endpoints, `passthrough:` prefixes) and forwarded as the same
string. Anything that an HTTP client or server further down could read as another path is
refused instead of repaired: dot-segments (`.`, `..`, also percent-encoded), encoded
slashes, backslashes, empty segments (`//v1/...`, a trailing `/`), control and non-ASCII
characters, a second round of percent-encoding (`%252e`), and dot-segments with a
parameter (`..;x`, which some servers read as `..`). aiohttp's URL parser
(yarl) removes dot-segments, so `/v1/models/../images/generations` would otherwise pass a
`/v1/models` prefix check and reach the upstream as an unmetered image request.

    >>> canonical(b"/v1/models/gpt-image-2")
    '/v1/models/gpt-image-2'
    >>> canonical(b"/v1/models/%2e%2e/images/generations") is None
    True
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# RFC 3986 `pchar` less `%`: every character a segment may hold once decoded. None of them
# needs encoding in a path, so the decoded path is also a valid URL path, sent as is.
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")
# The same characters with `/` between non-empty segments: most paths are this already.
_PLAIN = re.compile(rb"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]+)+")
_DOTS = (".", "..")

TOLLGATE_PATHS = "/v1/tollgate"
"""Tollgate's own paths under `/v1` (`GET /v1/tollgate/budget`): never forwarded upstream,
whatever `passthrough:` lists."""
OBJECT_PATHS = ("/v1/responses", "/v1/batches", "/v1/files")
"""Where OpenAI keeps the responses, batches and files of the company account, each of which
Tollgate keeps to the team that made it: only Tollgate's own routes reach them, which look
the object up first, never `passthrough:` (a path no route takes, `/v1/files/{id}/x` or
`…/content;x`, would name another team's object to an upstream that may read it as one)."""
CHAT_COMPLETIONS = "/v1/chat/completions"
"""Where OpenAI lists, reads, updates and deletes the chat completions stored under the
company key, every team's alike: under a `passthrough:` prefix, only `POST` of this path
itself (a new completion) is forwarded."""


def canonical(raw_path: bytes) -> str | None:
    """The path `raw_path` (as sent, still percent-encoded) names, or None when it is not
    canonical. Percent-escapes are decoded once; the result must not need decoding again."""
    if _PLAIN.fullmatch(raw_path) and b"/." not in raw_path:
        return raw_path.decode("ascii")  # nothing to decode, no segment starts with a dot
    try:
        text = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith("/"):
        return None
    segments = text[1:].split("/")
    for index, segment in enumerate(segments):
        if "%" in segment:
            try:
                segment = segments[index] = unquote(segment, errors="strict")
            except UnicodeDecodeError:
                return None
        # A dot-segment with a parameter (`..;x`) is one to readers that take `;` for the
        # start of a segment's parameters (Tomcat, Jetty, Spring): `/v1/models/..;/files`.
        if segment.split(";", 1)[0] in _DOTS or not _SEGMENT.fullmatch(segment):
            return None
    return "/" + "/".join(segments)


def under(path: str, prefix: str) -> bool:
    """Whether canonical `path` is `prefix` or below it, segment by segment:
    `/v1/models` covers `/v1/models/x`, not `/v1/modelsx`."""
    return path == prefix or path.startswith(prefix + "/")


# RFC 3986 `query`: kept percent-encoded as sent (only the upstream reads it), but nothing
# a URL parser could take for the end of the query or re-encode differently.
_QUERY = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def plain_query(raw_query: bytes) -> str | None:
    """`raw_query` (the bytes after `?`) when it can be forwarded as is, else None."""
    return raw_query.decode("ascii") if _QUERY.fullmatch(raw_query) else None
