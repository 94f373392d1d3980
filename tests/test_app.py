"""The ASGI entry in process: image requests go straight to their handler, everything else
through starlette's routes, and a fault of Tollgate's own still gets an OpenAI-shaped 500."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.datastructures import URL
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.testclient import TestClient

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.errors import ConfigError
from proxy.core.settings import Passthrough
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web import admin
from proxy.web.app import create_app
from proxy.web.passthrough import OtherPaths
from proxy.web.pipeline import Pipeline, new_request_id
from proxy.web.runtime import Overrides, Runtime
from tests.conftest import UPSTREAM_KEY, in_process, write_config

KEY = "tg_test_gateway_key"
BODY = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    with TestClient(in_process(tmp_path)) as test_client:
        yield test_client


def test_an_image_request_is_answered_by_its_handler(client: TestClient) -> None:
    answer = client.post("/v1/images/generations", json=BODY, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tollgate-team"] == "web"
    assert answer.json()["data"]


def test_other_methods_and_paths_still_go_through_the_routes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    wrong_method = client.get("/v1/images/generations", headers=HEADERS)
    assert wrong_method.status_code == 404  # as OpenAI answers: "Invalid URL (GET …)"
    assert "GET /v1/images/generations" in wrong_method.json()["error"]["message"]
    missing = client.post("/v1/images/unknown", json=BODY, headers=HEADERS)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_an_upload_without_a_purpose_is_refused_as_missing_it(client: TestClient) -> None:
    # The Node SDK checks no required parameter at run time: `files.create({file})` sends
    # the form without one.
    line = json.dumps({**BATCH_LINE, "custom_id": "a"}).encode() + b"\n"
    for data in ({}, {"purpose": ""}):
        answer = client.post(
            "/v1/files", headers=HEADERS, files={"file": ("in.jsonl", line)}, data=data
        )
        assert answer.status_code == 400
        error = answer.json()["error"]
        if data:
            assert error["message"].endswith("not ''."), error
        else:
            assert error["message"] == "Missing required parameter: 'purpose'.", error
        assert (error["param"], error["code"]) == ("purpose", "invalid_request")


def test_a_fault_of_tollgate_is_a_500_in_openai_shape(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Pipeline[Any], request: Request, runtime: Runtime) -> Response:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Pipeline, "handle", broken)
    answer = client.post("/v1/images/edits", json=BODY, headers=HEADERS)
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "internal_error"
    assert "a bug" not in answer.text  # the traceback is for the log, not the client
    assert "a bug" in caplog.text


def test_a_fault_outside_the_image_path_is_a_500_in_openai_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: OtherPaths, request: Request, runtime: Runtime) -> Response:
        raise RuntimeError("a bug")

    monkeypatch.setattr(OtherPaths, "handle", broken)
    write_config(tmp_path, "http://simulated/v1")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        answer = test_client.get("/v1/models")
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert "a bug" not in answer.text


def test_a_method_no_route_takes_is_a_405_in_openai_shape(client: TestClient) -> None:
    answer = client.post("/metrics")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_request_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("tg_req_") and len(i) == 39 for i in ids)
    # Later ids sort after earlier ones (ids of one microsecond share the prefix).
    assert [i[:20] for i in ids] == sorted(i[:20] for i in ids)


def test_a_reload_swaps_the_runtime_and_refuses_an_invalid_configuration(
    tmp_path: Path,
) -> None:
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    with TestClient(app) as test_client:
        first = app.current()
        assert test_client.post("/admin/reload", headers=admin).status_code == 200
        second = app.current()
        assert second is not first and second.ledger is first.ledger
        (tmp_path / "tollgate.yaml").write_text("upstream: [not, a, mapping]\n")
        refused = test_client.post("/admin/reload", headers=admin)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_config"
        assert app.current() is second


def test_with_several_workers_a_reload_answers_once_they_are_replaced(tmp_path: Path) -> None:
    """A worker checks the files and has every worker replaced; it answers when they are
    (or that they were not), and never takes the new configuration itself: had it taken it
    while a new worker failed to start, the workers would serve two configurations."""
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    asked: list[str] = []
    outcome: list[ConfigError | None] = [None]

    async def replace_workers() -> None:
        asked.append("replace")
        if outcome[0] is not None:
            raise outcome[0]

    app = create_app(
        load_config(tmp_path),
        Overrides(upstream_key=UPSTREAM_KEY),
        tmp_path,
        replace_workers=replace_workers,
    )
    with TestClient(app) as test_client:
        first = app.current()
        assert test_client.post("/admin/reload", headers=admin).status_code == 200
        assert asked == ["replace"] and app.current() is first
        outcome[0] = ConfigError(["policies: a new worker reading these files did not start"])
        refused = test_client.post("/admin/reload", headers=admin)
        assert refused.status_code == 400
        assert "did not start" in refused.json()["error"]["message"]
        (tmp_path / "tollgate.yaml").write_text("upstream: [not, a, mapping]\n")
        assert test_client.post("/admin/reload", headers=admin).status_code == 400
        assert asked == ["replace", "replace"]  # an invalid configuration is never sent on
        assert app.current() is first


def test_a_reload_that_names_another_ledger_is_refused(tmp_path: Path) -> None:
    """The spend and reservations live in the ledger opened at start: a reload that moved
    to another one (or said it had, keeping the old) would let every budget start again."""
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    settings = tmp_path / "tollgate.yaml"
    settings.write_text(settings.read_text().replace("sqlite:///tollgate.db", "sqlite:///b.db"))
    with TestClient(app) as test_client:
        first = app.current()
        refused = test_client.post("/admin/reload", headers=admin)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "invalid_config"
        assert "ledger: changed from" in error["message"] and "b.db" in error["message"]
        assert app.current() is first
    # Under `--ledger`, the file's ledger is not the one in use: changing it changes nothing.
    pinned = create_app(
        load_config(tmp_path),
        Overrides(upstream_key=UPSTREAM_KEY, ledger_url=f"sqlite:///{tmp_path}/c.db"),
        tmp_path,
    )
    settings.write_text(settings.read_text().replace("sqlite:///b.db", "sqlite:///d.db"))
    with TestClient(pinned) as test_client:
        assert test_client.post("/admin/reload", headers=admin).status_code == 200


def test_a_reload_reads_the_files_while_the_app_goes_on_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are read on a thread: a request that arrives meanwhile is answered before
    the reload ends (on the event loop it would wait for the whole reading)."""
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    reading, read_on = threading.Event(), threading.Event()

    def slow_load(source: Path) -> Any:
        reading.set()
        assert read_on.wait(30)
        return load_config(source)

    monkeypatch.setattr("proxy.web.reload.load_config", slow_load)
    with TestClient(app) as test_client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = app.current()
        reloaded = pool.submit(test_client.post, "/admin/reload", headers=admin)
        assert reading.wait(30)
        assert test_client.get("/healthz").status_code == 200  # while the files are read
        assert app.current() is first and not reloaded.done()
        read_on.set()
        assert reloaded.result(30).status_code == 200
        assert app.current() is not first


@pytest.mark.parametrize("readable", [True, False], ids=["read-again", "unreadable"])
def test_a_worker_replaced_by_a_reload_decides_under_the_files_read_again_or_refuses(
    tmp_path: Path, readable: bool
) -> None:
    """With several workers, an old worker told it was replaced (`Reloader.replaced`) may
    still take a request: it used to admit it under the configuration the reload replaced
    (here a key the reload revoked). It reads the files again and decides under them; if
    it cannot, it refuses what it still takes with a 503 the SDKs retry elsewhere."""
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    transport = httpx.ASGITransport(app=simulator)
    app = create_app(load_config(tmp_path), Overrides(transport=transport), tmp_path)

    with TestClient(app) as test_client:
        assert test_client.post("/v1/images/generations", json=BODY, headers=HEADERS).is_success
        team = tmp_path / "teams" / "web.yaml"
        team.write_text(team.read_text().replace(key_hash(KEY), key_hash("tg_test_rotated")))
        if not readable:  # changed again since the new workers read it, and invalid
            (tmp_path / "tollgate.yaml").write_text("upstream: [not, a, mapping]\n")
        assert test_client.portal is not None
        test_client.portal.call(app.on_replaced)  # on the event loop, as the signal has it
        answer = test_client.post("/v1/images/generations", json=BODY, headers=HEADERS)
    if readable:
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
    else:
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "server_error"
        assert answer.json()["error"]["code"] == "configuration_reloaded"
        assert answer.headers["x-should-retry"] == "true"
        assert answer.headers["connection"] == "close"


def test_admin_refusals_are_answered_in_openai_shape(client: TestClient) -> None:
    answer = client.get("/admin/budgets")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("prefix", "target"),
    [
        ("/v1/files", "/v1/files/file-theirs/content;x"),
        ("/v1/files", "/v1/files/file-theirs/x"),
        ("/v1/batches", "/v1/batches/batch_theirs/x"),
        ("/v1/responses", "/v1/responses/resp_theirs/input_items;x"),
        ("/v1/Responses", "/v1/Responses/resp_theirs"),
        ("/v1/FILES", "/v1/FILES/file-theirs/content"),
    ],
)
def test_no_passthrough_reaches_the_objects_tollgate_keeps_to_each_team(
    tmp_path: Path, prefix: str, target: str
) -> None:
    # Set past the loader, which refuses such a prefix: the request path refuses it too.
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    config = replace(load_config(tmp_path), passthrough=(Passthrough(prefix),))
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    app = create_app(config, Overrides(transport=httpx.ASGITransport(app=simulator)), tmp_path)
    with TestClient(app) as client, TestClient(simulator) as upstream:
        answer = client.get(target, headers=HEADERS)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
        arrived = upstream.get("/_sim/arrivals").json()["requests"]
        assert [a["raw_path"] for a in arrived] == ["/_sim/arrivals"]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/chat/completions/chatcmpl-theirs"),
        ("GET", "/v1/chat/completions/chatcmpl-theirs/messages"),
        ("POST", "/v1/chat/completions/chatcmpl-theirs"),
        ("DELETE", "/v1/chat/completions/chatcmpl-theirs"),
        ("GET", "/v1/Chat/Completions"),
    ],
)
def test_stored_chat_completions_are_never_passed_through(
    tmp_path: Path, method: str, target: str
) -> None:
    # OpenAI lists, reads, updates and deletes the completions stored under the company
    # key, every team's alike: only their creation is forwarded.
    write_config(tmp_path, "http://simulated/v1", settings="""
        passthrough:
          - {path: /v1/chat, methods: [GET, POST, DELETE]}
          - {path: /v1/Chat, methods: [GET]}
    """, teams={"web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"})  # fmt: skip
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    app = in_process(tmp_path, simulator)
    with TestClient(app) as client, TestClient(simulator) as upstream:
        answer = client.request(method, target, headers=HEADERS, json={})
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
        client.post("/v1/chat/completions", headers=HEADERS, json={})  # forwarded
        arrived = [a["raw_path"] for a in upstream.get("/_sim/arrivals").json()["requests"]]
        assert arrived == ["/v1/chat/completions", "/_sim/arrivals"]


def host_built_url(self: HTTPConnection) -> URL:
    """`request.url` as starlette made it before 1.7: the client's `Host` header, then the
    path, read back as one URL (a `/` or `#` in the header moved the path it reads)."""
    host = dict(self.scope["headers"]).get(b"host", b"").decode("latin-1")
    return URL(f"http://{host}{self.scope['path']}")


BATCH_LINE = {"method": "POST", "url": "/v1/images/generations", "body": BODY}


def test_a_host_header_never_changes_the_path_checked_and_forwarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is checked by the route's path, and was read by `request.url.path`: under
    # starlette 1.0 to 1.6 (which `starlette>=1.0` installs), a team read another's file.
    monkeypatch.setattr(HTTPConnection, "url", property(host_built_url))
    other = "tg_test_gateway_other"
    write_config(tmp_path, "http://simulated/v1", settings="passthrough: [/v1/models]\n", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
        "other": f"name: other\nkeys:\n  - {{id: k, sha256: {key_hash(other)}}}\n",
    })  # fmt: skip
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    app = in_process(tmp_path, simulator)
    with TestClient(app) as client, TestClient(simulator) as upstream:
        ids = {}
        for name, key in (("mine", KEY), ("theirs", other)):
            line = json.dumps({**BATCH_LINE, "custom_id": name}).encode() + b"\n"
            uploaded = client.post(
                "/v1/files",
                headers={"authorization": f"Bearer {key}"},
                files={"file": ("in.jsonl", line)},
                data={"purpose": "batch"},
            )
            assert uploaded.status_code == 200, uploaded.text
            ids[name] = uploaded.json()["id"]
        forged = {**HEADERS, "host": f"x/v1/files/{ids['theirs']}/content#"}
        answer = client.get(f"/v1/files/{ids['mine']}/content", headers=forged)
        assert answer.status_code == 200
        assert json.loads(answer.content)["custom_id"] == "mine"
        forged = {**HEADERS, "host": "x/v1/models/../images/generations#"}
        assert client.get("/v1/models", headers=forged).status_code == 200
        arrived = [a["raw_path"] for a in upstream.get("/_sim/arrivals").json()["requests"]]
        assert arrived[-2:] == ["/v1/models", "/_sim/arrivals"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("fromm=2026-01-01", "fromm"),  # a typo: the current month's report instead
        ("start=2026-01-01&end=2026-01-31", "start"),
        ("by=user&by=team", "by"),  # one of the two groupings, silently
        ("by=,,,", "by"),  # no grouping, silently
        ("by=team,team", "by"),  # grouped by team, silently
        ("format=csv&format=json", "format"),
        ("format=csv&excel=on", "excel"),  # no byte-order mark, silently
        ("audit=y", "audit"),  # the summary instead of the audit export
        ("token=admin-secret-for-tests", "token"),
    ],
)
def test_an_admin_report_parameter_the_cli_has_no_flag_for_is_refused(
    tmp_path: Path, query: str, param: str
) -> None:
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    with TestClient(app) as test_client:
        answer = test_client.get(f"/admin/report?{query}", headers=admin)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_request", param)
        assert param in error["message"]
        for fine in ("", "by=team&format=csv&excel=TRUE", "audit=0&excel=no&format=json"):
            assert test_client.get(f"/admin/report?{fine}", headers=admin).status_code == 200


def test_the_admin_token_is_compared_in_time_that_does_not_tell_its_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[int, int]] = []
    real = admin.hmac.compare_digest

    def recorded(a: Any, b: Any) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", recorded)
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    with TestClient(app) as test_client:
        for token, status in (
            ("a", 401),
            ("admin-secret-and-more", 401),
            ("admin-secret-for-tests", 200),
        ):
            answer = test_client.get("/admin/budgets", headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == status
    assert len(set(compared)) == 1 and compared[0][0] == compared[0][1]
