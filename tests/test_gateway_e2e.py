"""The gateway against hostile input, through a running Tollgate and simulated upstream.

Paths are sent with a raw socket: HTTP clients (httpx, the SDKs) tidy a path before
sending it, and the point is what happens to the paths they would not send.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    output,
    start_tollgate,
    wait_for,
    write_config,
)

# The order of the probe: far more than the team may buy, and billed if it ever arrives.
EXPENSIVE = json.dumps(
    {
        "model": "gpt-image-2",
        "prompt": "a lighthouse",
        "size": "3840x2160",
        "quality": "high",
        "n": 10,
    }
).encode()
CHEAP = {"model": "gpt-image-1-mini", "prompt": "a lighthouse", "quality": "low", "n": 1}
TEAMS = {
    "design": f"""
        name: design
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
        allow:
          models: [gpt-image-1-mini]
          max_n: 1
    """,
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
}


@pytest.fixture(scope="module")
def gate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("gate")
    write_config(root, f"{simulator.url}/v1", teams=TEAMS, settings="""
        passthrough:
          - /v1/models
          - {path: /v1/organization/costs, methods: [GET]}
    """)  # fmt: skip
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def raw(
    base: str, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send `target` byte for byte, as no HTTP client library would."""
    where = urlsplit(base)
    assert where.hostname == "127.0.0.1" and where.port
    lines = [f"{method} {target} HTTP/1.1", f"host: 127.0.0.1:{where.port}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    with socket.create_connection(("127.0.0.1", where.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        answer = http.client.HTTPResponse(sock, method=method)
        answer.begin()
        return answer.status, answer.headers, answer.read()


def keyed(key: str = DESIGN_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def forwarded(simulator: Simulator) -> list[dict[str, Any]]:
    """What reached the simulator with the company key: only Tollgate sends that."""
    arrivals: list[dict[str, Any]] = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    return [a for a in arrivals if a["authorization"] == f"Bearer {UPSTREAM_KEY}"]


def assert_openai_error(status: int, body: bytes, expected: int | tuple[int, ...]) -> None:
    allowed = (expected,) if isinstance(expected, int) else expected
    assert status in allowed, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]


DOT_SEGMENTS = [
    "/v1/models/../images/generations",
    "/v1/models/%2e%2e/images/generations",
    "/v1/models/%2E%2E/images/generations",
    "/v1/models/.%2e/images/generations",
    "/v1/models/./../images/generations",
    "/v1/models/..%2fimages/generations",
    "/v1/models/..%2Fimages/generations",
    "/v1/models/%2f..%2fimages/generations",
    "/v1/models%2f..%2fimages%2fgenerations",
    "/v1/models/%2e%2e%2fimages%2fgenerations",
    "/v1/models/%252e%252e/images/generations",
    "/v1/models/..%5cimages/generations",
    "/v1/models/..\\images/generations",
    "/v1/models/x/../../images/generations",
    "/v1/models/../../_sim/billing",
    "/v1/models/%2e%2e/%2e%2e/_sim/billing",
    "/v1/models/..%2f..%2f_sim%2fbilling",
    "//v1/images/generations",
    "/v1//images/generations",
    "/v1/models//../images/generations",
    "/v1/models/%00/../images/generations",
    "/v1/models/a%0d%0ab",
    "/v1/images/generations/",
    "/v1/images/generations/.",
    # A dot-segment with a parameter: Tomcat, Jetty and Spring read `..;x` as `..`.
    "/v1/models/..;/images/generations",
    "/v1/models/..;x/..;/_sim/billing",
    "/v1/models/.;/..%3B/images/generations",
]


@pytest.mark.parametrize("target", DOT_SEGMENTS)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_path_that_is_not_canonical_is_refused_and_never_forwarded(
    gate: Tollgate, simulator: Simulator, target: str, method: str
) -> None:
    before = len(forwarded(simulator))
    billed = len(simulator.billing())
    status, headers, body = raw(gate.url, method, target, keyed(), EXPENSIVE)
    assert_openai_error(status, body, (400, 404))
    assert headers["content-type"] == "application/json"
    assert UPSTREAM_KEY not in body.decode()
    assert len(forwarded(simulator)) == before
    assert len(simulator.billing()) == billed


def test_a_passthrough_path_reaches_the_upstream_exactly_as_it_was_matched(
    gate: Tollgate, simulator: Simulator
) -> None:
    before = len(forwarded(simulator))
    status, headers, body = raw(
        gate.url, "GET", "/v1/organization/costs?start_time=0&limit=1", keyed()
    )
    assert status == 200, body
    assert headers["x-tollgate-team"] == "design"
    # An escape that decodes to a plain character is sent as that character.
    status, _, body = raw(gate.url, "GET", "/v1/models/ft%3Agpt-image-1-mini", keyed())
    assert status == 404 and json.loads(body)["error"]  # the simulator has no models list
    arrived = forwarded(simulator)[before:]
    assert [(a["method"], a["raw_path"], a["query"]) for a in arrived] == [
        ("GET", "/v1/organization/costs", "start_time=0&limit=1"),
        ("GET", "/v1/models/ft:gpt-image-1-mini", ""),
    ]


def test_a_query_that_is_not_plain_is_refused_and_never_forwarded(
    gate: Tollgate, simulator: Simulator
) -> None:
    # Objects of the team's own, so that their paths reach the query's check.
    client = gate.client(RESEARCH_KEY)
    file_id = client.files.create(file=("a.png", b"png"), purpose="vision").id
    response_id = client.responses.create(model="gpt-5.5", input="a", max_output_tokens=16).id
    before = len(forwarded(simulator))
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/files"),
        ("GET", f"/v1/files/{file_id}"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/responses/{response_id}"),
        ("DELETE", f"/v1/responses/{response_id}"),
        ("POST", "/v1/responses/input_tokens"),
    ]:
        status, _, body = raw(gate.url, method, f"{path}?a=%zz", keyed(RESEARCH_KEY), b"{}")
        assert_openai_error(status, body, 400)
        assert "percent-encoded" in json.loads(body)["error"]["message"], (method, path)
    assert len(forwarded(simulator)) == before
    assert client.files.retrieve(file_id).id == file_id
    assert client.responses.retrieve(response_id).id == response_id


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("DELETE", "/v1/models/gpt-image-2"),
        ("POST", "/v1/models"),
        ("PUT", "/v1/models/x"),
        ("PATCH", "/v1/models/x"),
        ("POST", "/v1/organization/costs"),
        ("DELETE", "/v1/organization/costs"),
        ("OPTIONS", "/v1/models"),
        ("TRACE", "/v1/models"),
    ],
)
def test_passthrough_forwards_only_the_methods_it_lists(
    gate: Tollgate, simulator: Simulator, method: str, target: str
) -> None:
    before = len(forwarded(simulator))
    status, headers, body = raw(gate.url, method, target, keyed(), b"{}")
    assert_openai_error(status, body, 405)
    assert "GET" in headers["allow"]
    assert len(forwarded(simulator)) == before


def logged_line(gate: Tollgate, request_id: str) -> dict[str, Any]:
    """The JSON log line of the request `request_id`, once it is written."""

    def line() -> dict[str, Any] | None:
        for text in output(gate.process).splitlines():
            if request_id in text and text.startswith("{"):
                found: dict[str, Any] = json.loads(text)
                if found.get("request_id") == request_id:
                    return found
        return None

    return wait_for(f"the log line of {request_id}", line)


def test_a_passthrough_request_has_its_log_line_naming_team_key_and_upstream_id(
    gate: Tollgate, simulator: Simulator
) -> None:
    """Forwarded with the company key, unmetered: which team sent it, and OpenAI's id for
    it, are in the log as for any request; a refused method names the team too."""
    answer = httpx.get(f"{gate.url}/v1/models", headers=keyed(), timeout=30)
    assert answer.status_code == 200
    line = logged_line(gate, answer.headers["x-tollgate-request-id"])
    assert (line["team"], line["key_id"], line["endpoint"]) == ("design", "web-app", "passthrough")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/models", 200)
    assert (line["outcome"], line["cost_usd"]) == ("ok", None)
    unknown = httpx.get(f"{gate.url}/v1/models/no-such-model", headers=keyed(), timeout=30)
    assert unknown.status_code == 404  # the upstream's answer, with its request id
    line = logged_line(gate, unknown.headers["x-tollgate-request-id"])
    assert line["upstream_request_id"] == unknown.headers["x-request-id"]
    assert (line["status"], line["outcome"]) == (404, "upstream_error")
    refused = httpx.post(f"{gate.url}/v1/models", headers=keyed(), timeout=30)
    assert refused.status_code == 405 and refused.headers["x-tollgate-team"] == "design"
    line = logged_line(gate, refused.headers["x-tollgate-request-id"])
    assert (line["status"], line["error_code"], line["outcome"]) == (
        405,
        "method_not_allowed",
        "client_error",
    )


def test_a_request_on_a_teams_own_objects_has_its_log_line(gate: Tollgate) -> None:
    """A listing, an upload, a read or a delete of a file, batch or stored response leaves
    no ledger row; its log line says which team did it, with which key, and what came of
    it, as every other request's does."""
    listing = httpx.get(f"{gate.url}/v1/files", headers=keyed(), timeout=30)
    assert listing.status_code == 200
    line = logged_line(gate, listing.headers["x-tollgate-request-id"])
    assert (line["team"], line["key_id"], line["endpoint"]) == ("design", "web-app", "files")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/files", 200)
    assert (line["outcome"], line["cost_usd"]) == ("ok", "0")
    gone = httpx.delete(f"{gate.url}/v1/files/file-not-ours", headers=keyed(), timeout=30)
    assert gone.status_code == 404
    line = logged_line(gate, gone.headers["x-tollgate-request-id"])
    assert (line["method"], line["path"]) == ("DELETE", "/v1/files/file-not-ours")
    assert (line["status"], line["outcome"], line["error_code"]) == (
        404,
        "client_error",
        "not_found",
    )


def test_a_teams_own_budget_asked_has_its_request_id_and_log_line(gate: Tollgate) -> None:
    """`GET /v1/tollgate/budget` is a request as any other: one log line (SPEC 4), naming
    the team and key that asked, and the request id its answer carries."""
    asked = httpx.get(f"{gate.url}/v1/tollgate/budget", headers=keyed(), timeout=30)
    assert asked.status_code == 200 and asked.json()["team"] == "design"
    line = logged_line(gate, asked.headers["x-tollgate-request-id"])
    assert (line["team"], line["key_id"], line["endpoint"]) == ("design", "web-app", "budget")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/tollgate/budget", 200)
    assert (line["outcome"], line["cost_usd"]) == ("ok", "0")


def requests_rows(gate: Tollgate) -> int:
    return int(gate.query("SELECT count(*) AS n FROM requests")[0]["n"])


def unauthenticated(gate: Tollgate, endpoint: str, reason: str) -> float:
    return gate.metric("tollgate_unauthenticated_requests_total", endpoint=endpoint, reason=reason)


def test_requests_with_a_bad_key_are_counted_but_never_written_to_the_ledger(
    gate: Tollgate, simulator: Simulator
) -> None:
    rows = requests_rows(gate)
    invalid = unauthenticated(gate, "generations", "invalid_key")
    missing = unauthenticated(gate, "passthrough", "missing_key")
    bogus = "tg_bogus_key_that_must_never_be_logged_0123456789"
    with httpx.Client(base_url=gate.url, timeout=30) as client:
        for _ in range(300):
            answer = client.post(
                "/v1/images/generations",
                content=EXPENSIVE,
                headers=keyed(bogus),
            )
            assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["x-tollgate-request-id"].startswith("tg_req_")
        for _ in range(20):
            anonymous = client.get("/v1/models")
            assert anonymous.status_code == 401
        assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
        assert anonymous.headers["x-tollgate-request-id"].startswith("tg_req_")
    assert requests_rows(gate) == rows
    assert unauthenticated(gate, "generations", "invalid_key") == invalid + 300
    assert unauthenticated(gate, "passthrough", "missing_key") == missing + 20
    log = output(gate.process)
    assert bogus not in log and bogus[-4:] not in log
    assert log.count("for their key") <= 4  # throttled: not one line per request


def test_every_line_tollgate_logs_is_json_refusals_for_a_key_included(gate: Tollgate) -> None:
    """One JSON object a line, as SPEC's structured log is read: the warning that counts
    the requests refused for their key is one too, not a line of words among them."""
    with httpx.Client(base_url=gate.url, timeout=30) as client:
        assert client.post("/v1/images/generations", content=EXPENSIVE).status_code == 401
    log = wait_for(
        "a refusal for a key logged",
        lambda: output(gate.process) if "for their key" in output(gate.process) else None,
    )
    refusals = [json.loads(line) for line in log.splitlines() if "for their key" in line]
    assert {(r["level"], r["logger"]) for r in refusals} == {("warning", "tollgate.requests")}


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "status"),
    [
        ("POST", "/v1/files", "files", 400),
        ("POST", "/v1/responses/input_tokens", "responses", 400),
        ("GET", "/v1/responses/resp_unknown", "responses", 404),
        ("GET", "/v1/files/file_unknown", "files", 404),
        ("GET", "/v1/files?limit=0", "files", 400),
    ],
    ids=["upload", "input_tokens", "stored_response", "file", "file_listing"],
)
def test_requests_that_leave_no_row_are_refused_for_their_key_and_answered_with_their_ids(
    gate: Tollgate, simulator: Simulator, method: str, path: str, endpoint: str, status: int
) -> None:
    """An upload, an input token count, a stored response's or file's path, a listing: an
    unknown key is refused 401 (counted under the endpoint, free), and a known key's bad
    request answered in OpenAI's shape; either answer names its request id, the second its
    team too."""
    before = len(forwarded(simulator))
    rows = requests_rows(gate)
    invalid = unauthenticated(gate, endpoint, "invalid_key")
    body = b'{"input": "x"}'
    plain = {"content-type": "text/plain"}
    with httpx.Client(base_url=gate.url, timeout=30) as client:
        refused = client.request(
            method, path, content=body, headers={**keyed("tg_bogus_key_0001"), **plain}
        )
        known = client.request(method, path, content=body, headers={**keyed(), **plain})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["x-tollgate-request-id"].startswith("tg_req_")
    assert refused.headers["x-tollgate-cost-usd"] == "0"
    assert "x-tollgate-team" not in refused.headers
    assert unauthenticated(gate, endpoint, "invalid_key") == invalid + 1
    assert known.status_code == status, known.text
    assert set(known.json()["error"]) == {"message", "type", "param", "code"}
    assert known.headers["x-tollgate-request-id"].startswith("tg_req_")
    assert known.headers["x-tollgate-team"] == "design"
    assert requests_rows(gate) == rows
    assert len(forwarded(simulator)) == before


METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]
PATHS = [
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/images/unknown",
    "/v1/chat/completions",
    "/v1/models",
    "//v1/images/generations",
    "/v1/images/generations/",
    "/",
    "/nowhere",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/budgets",
    "/admin/reload",
    "/v1/models/%2e%2e/images/edits",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_every_answer_tollgate_makes_itself_is_in_openai_shape(
    gate: Tollgate, method: str, path: str
) -> None:
    status, headers, body = raw(gate.url, method, path, {"content-type": "application/json"})
    if status < 400:
        return  # a route that answers this (healthz, metrics)
    assert headers["content-type"] == "application/json", body
    if method != "HEAD":
        assert_openai_error(status, body, status)


def test_a_compressed_body_is_refused_before_it_is_read(
    gate: Tollgate, simulator: Simulator
) -> None:
    billed = len(simulator.billing())
    rows = requests_rows(gate)
    packed = gzip.compress(json.dumps(CHEAP).encode())
    for encoding in ("gzip", "deflate", "br", "identity, gzip"):
        status, _, body = raw(
            gate.url,
            "POST",
            "/v1/images/generations",
            {**keyed(), "content-encoding": encoding},
            packed,
        )
        assert_openai_error(status, body, 415)
        assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    assert len(simulator.billing()) == billed
    assert requests_rows(gate) == rows
    plain = httpx.post(
        f"{gate.url}/v1/images/generations",
        json=CHEAP,
        headers={**keyed(), "content-encoding": "identity"},
        timeout=30,
    )
    assert plain.status_code == 200, plain.text


def test_upstream_headers_reach_a_team_only_when_allowed(
    gate: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(
        response_headers={
            "openai-organization": "org-company",
            "openai-project": "proj-company",
            "set-cookie": "session=company",
            "x-internal-route": "pool-7",
            "x-ratelimit-remaining-images": "41",
        }
    )
    try:
        image = httpx.post(
            f"{gate.url}/v1/images/generations", json=CHEAP, headers=keyed(), timeout=30
        )
        passed = httpx.get(
            f"{gate.url}/v1/organization/costs", params={"start_time": 0}, headers=keyed()
        )
    finally:
        simulator.configure(response_headers={})
    for answer in (image, passed):
        assert answer.status_code == 200, answer.text
        names = {name.lower() for name in answer.headers}
        assert not {"openai-organization", "openai-project", "set-cookie", "x-internal-route"} & (
            names
        )
        assert answer.headers["x-ratelimit-remaining-images"] == "41"
        assert answer.headers["x-tollgate-team"] == "design"
    assert image.headers["x-request-id"].startswith("req_")


def test_passthrough_cannot_be_configured_over_an_image_endpoint(
    simulator: Simulator, tmp_path: Path
) -> None:
    from proxy.config import load_config
    from proxy.core.errors import ConfigError

    for prefix in ("/v1/images", "/v1/Images/edits", "/v1/i", "{path: /v1/images/x}"):
        write_config(tmp_path, f"{simulator.url}/v1", settings=f"passthrough: [{prefix}]\n")
        with pytest.raises(ConfigError, match="would forward image requests unmetered"):
            load_config(tmp_path)


def test_passthrough_cannot_be_configured_to_mint_client_secrets(
    simulator: Simulator, tmp_path: Path
) -> None:
    # POST /v1/realtime/client_secrets answers an ephemeral key made with the key that
    # called it, POST /v1/realtime/calls a WebRTC session on its account: passed through, a
    # team would leave with a credential of the upstream account.
    from proxy.config import load_config
    from proxy.core.errors import ConfigError

    for prefix in ("/v1/realtime", "/v1/realtime/client_secrets", "/v1/realtime/calls",
                   "/v1/chatkit"):  # fmt: skip
        settings = f"passthrough:\n  - {{path: {prefix}, methods: [GET, POST]}}\n"
        write_config(tmp_path, f"{simulator.url}/v1", settings=settings)
        with pytest.raises(ConfigError, match="mint client secrets or sessions with the upstream"):
            load_config(tmp_path)
    write_config(tmp_path, f"{simulator.url}/v1", settings="passthrough: [/v1/realtime]\n")
    assert load_config(tmp_path).passthrough[0].prefix == "/v1/realtime"  # reading is fine
    # Chat completions share only letters with /v1/chatkit: still forwarded for POST.
    settings = "passthrough:\n  - {path: /v1/chat, methods: [POST]}\n"
    write_config(tmp_path, f"{simulator.url}/v1", settings=settings)
    assert load_config(tmp_path).passthrough[0].prefix == "/v1/chat"
