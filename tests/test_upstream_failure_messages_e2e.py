"""A team told that the upstream failed is not told where the upstream is.

What the HTTP client says of a failure names the upstream's host and port (a connection
refused, a name that does not resolve) or its whole URL (an answer it could not read):
an egress proxy's or a gateway's, which are the operators' to know. The team's 502 names
the kind of failure; the log line for the operators says the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Tollgate, in_front_of_raw, read_request, run_tollgate, write_config

HOST = "egress-gateway.tollgate-test.invalid"
PROMPT = {"model": "gpt-image-2", "prompt": "a kite", "quality": "low", "size": "1024x1024"}


@pytest.fixture
def unresolved(tmp_path: Path) -> Iterator[Tollgate]:
    """A Tollgate whose upstream's host name does not resolve."""
    write_config(tmp_path, f"http://{HOST}:8443/v1", settings="passthrough: [/v1/models]\n")
    yield from run_tollgate(tmp_path)


async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An answer no HTTP parser reads."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n{}")
    await writer.drain()
    writer.close()


def failure_of(call: Callable[[], object]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_an_upstream_that_cannot_be_reached_is_not_named_to_the_team(
    unresolved: Tollgate,
) -> None:
    client = unresolved.client()
    failures = [
        failure_of(lambda: client.images.generate(**PROMPT)),  # type: ignore[arg-type]
        failure_of(lambda: client.models.list()),
    ]
    for failure in failures:
        assert failure.status_code == 502
        error = failure.body  # openai reads the `error` object out
        assert isinstance(error, dict)
        assert error["code"] == "upstream_unavailable"
        assert "ClientConnectorDNSError" in error["message"]
        assert HOST not in failure.response.text and "8443" not in failure.response.text
    assert HOST in unresolved.stop()  # the operators read it in the log


def test_an_answer_that_cannot_be_read_does_not_show_the_upstream_url(tmp_path: Path) -> None:
    with in_front_of_raw(garbled, tmp_path, settings="passthrough: [/v1/models]\n") as proxy:
        url = proxy.root.joinpath("tollgate.yaml").read_text().split("base_url: ", 1)[1]
        upstream = url.split()[0]  # http://127.0.0.1:PORT/v1
        client = proxy.client()
        failures = [
            failure_of(lambda: client.images.generate(**PROMPT)),  # type: ignore[arg-type]
            failure_of(lambda: client.models.list()),
        ]
        for failure in failures:
            assert failure.status_code == 502
            assert failure.body["code"] == "upstream_unavailable"  # type: ignore[index]
            assert upstream.removesuffix("/v1") not in failure.response.text
        log = proxy.stop()
    assert f"{upstream}/models" in log
