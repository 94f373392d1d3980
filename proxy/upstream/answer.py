"""What the request path reads of an upstream answer, whichever HTTP client fetched it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from multidict import CIMultiDictProxy

from proxy.core.errors import UpstreamTimeout, UpstreamUnavailable

BROKEN_OFF = (UpstreamTimeout, UpstreamUnavailable)
"""What reading an `Answer`'s body raises when it breaks off."""


class Answer(Protocol):
    """An upstream answer whose body is still to be read, whichever client fetched it.

    Reading the body raises one of `BROKEN_OFF` when it breaks off, so the request path
    needs to know no HTTP library.
    """

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """Case-insensitive, duplicates kept."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The raw body as it arrives (never decompressed); it can be read once."""
        ...

    async def aclose(self) -> None:
        """Give the connection back (closed if the body was not read to its end);
        safe to call twice, and after a broken read."""
        ...
