"""A passthrough path's body that names files: only the team's own, as everywhere else.

OpenAI reads a file named by its id under the company key, whichever team uploaded it: a
chat completion with `{"type": "file", "file": {"file_id": …}}` has the model read the file
(a PDF of `user_data`) into its answer. Passed through unchecked, it would show one team
another team's upload, which `GET /v1/files/{id}/content` answers 404 to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.core.errors import LedgerError
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web.gateway import Gateway
from tests.conftest import UPSTREAM_KEY, in_process, write_config

MINE = "tg_test_passthrough_files_mine"
THEIRS = "tg_test_passthrough_files_theirs"
CHAT = "/v1/chat/completions"


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    write_config(tmp_path, "http://simulated/v1", settings="""
        passthrough:
          - {path: /v1/chat/completions, methods: [POST]}
          - {path: /v1/moderations, methods: [POST]}
    """, teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(MINE)}}}\n",
        "other": f"name: other\nkeys:\n  - {{id: k, sha256: {key_hash(THEIRS)}}}\n",
    })  # fmt: skip
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    with TestClient(in_process(tmp_path, simulator)) as client, TestClient(simulator) as upstream:
        yield client, upstream


def keyed(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def upload(client: TestClient, key: str) -> str:
    answer = client.post(
        "/v1/files",
        headers=keyed(key),
        files={"file": ("notes.pdf", b"%PDF-1.4 the other team's plans")},
        data={"purpose": "user_data"},
    )
    assert answer.status_code == 200, answer.text
    file_id: str = answer.json()["id"]
    return file_id


def chat(file_id: str) -> dict[str, Any]:
    part = {"type": "file", "file": {"file_id": file_id}}
    text = {"type": "text", "text": "Summarise this file"}
    return {"model": "gpt-5.5", "messages": [{"role": "user", "content": [text, part]}]}


def arrived(upstream: TestClient) -> list[str]:
    requests = upstream.get("/_sim/arrivals").json()["requests"]
    return [a["raw_path"] for a in requests if a["raw_path"] != "/_sim/arrivals"]


def test_another_teams_file_named_in_a_passthrough_body_is_never_forwarded(
    clients: tuple[TestClient, TestClient],
) -> None:
    client, upstream = clients
    theirs, mine = upload(client, THEIRS), upload(client, MINE)
    before = arrived(upstream)
    escaped = json.dumps(chat(theirs)).replace('"file_id"', '"file\\u005fid"')
    for body, content_type in [
        (json.dumps(chat(theirs)), "application/json"),
        (json.dumps(chat(theirs)), "text/plain"),  # a JSON body whatever its type says
        (escaped, "application/json"),
        (json.dumps({**chat(mine), "x": chat(theirs)}), "application/json"),
        (json.dumps(chat("file-never-uploaded")), "application/json"),
    ]:
        answer = client.post(
            CHAT, content=body, headers={**keyed(MINE), "content-type": content_type}
        )
        assert answer.status_code == 404, (body, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    assert arrived(upstream) == before
    # The team's own file goes through, as does a body naming none.
    client.post(CHAT, json=chat(mine), headers=keyed(MINE))
    client.post("/v1/moderations", json={"input": "hello"}, headers=keyed(MINE))
    assert arrived(upstream)[len(before) :] == [CHAT, "/v1/moderations"]


def test_a_body_that_is_not_json_and_names_a_file_id_is_refused(
    clients: tuple[TestClient, TestClient],
) -> None:
    client, upstream = clients
    theirs = upload(client, THEIRS)
    before = arrived(upstream)
    for body in (f"file_id={theirs}", f"file%5Fid={theirs}"):
        answer = client.post(
            CHAT,
            content=body,
            headers={**keyed(MINE), "content-type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 400, answer.text
    assert arrived(upstream) == before


def test_a_form_that_also_reads_as_json_naming_no_file_is_refused(
    clients: tuple[TestClient, TestClient],
) -> None:
    """Read as JSON, each body names no file (its `file_id` is inside a string); read as
    the form its content type says, which is how the upstream reads it, it names one."""
    client, upstream = clients
    theirs = upload(client, THEIRS)
    before = arrived(upstream)
    part = f'\r\n--B\r\ncontent-disposition: form-data; name="file_id"\r\n\r\n{theirs}\r\n--B--\r\n'
    for body, content_type in [
        (json.dumps({"a": f"&file_id={theirs}&"}), "application/x-www-form-urlencoded"),
        (json.dumps({"a": f"&file%5Fid={theirs}&"}), "Application/X-WWW-Form-Urlencoded"),
        ('{"a": "' + part + '"}', "multipart/form-data; boundary=B"),  # raw CR/LF: lax JSON
    ]:
        answer = client.post(
            CHAT, content=body, headers={**keyed(MINE), "content-type": content_type}
        )
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_request"
    assert arrived(upstream) == before


def test_a_json_body_in_utf_16_is_read_for_its_files_too(
    clients: tuple[TestClient, TestClient],
) -> None:
    client, upstream = clients
    theirs = upload(client, THEIRS)
    before = arrived(upstream)
    for encoding in ("utf-16", "utf-32-le"):
        body = json.dumps(chat(theirs)).encode(encoding)
        answer = client.post(
            CHAT, content=body, headers={**keyed(MINE), "content-type": "application/json"}
        )
        assert answer.status_code == 404, answer.text
    assert arrived(upstream) == before


def test_a_ledger_that_cannot_say_whose_file_it_is_forwards_nothing(
    clients: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, upstream = clients
    mine = upload(client, MINE)
    before = arrived(upstream)
    gateway = client.app
    assert isinstance(gateway, Gateway) and gateway.runtime is not None

    async def unreachable(object_ids: Any) -> dict[str, str]:
        raise LedgerError("the ledger is down")

    monkeypatch.setattr(gateway.runtime.ledger, "teams_of", unreachable)
    answer = client.post(CHAT, json=chat(mine), headers=keyed(MINE))
    assert answer.status_code == 503, answer.text
    assert arrived(upstream) == before


def test_a_long_document_of_commas_naming_no_file_goes_through(
    clients: tuple[TestClient, TestClient],
) -> None:
    """A chat whose text is a CSV of 150,000 cells (and says "file"): its commas are not
    values to decode, and it is read on a thread (past 256 KiB); an object spam is
    refused."""
    client, upstream = clients
    before = arrived(upstream)
    table = "\n".join(",".join(str(c) for c in range(10)) for _ in range(15_000))
    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "file:\n" + table}]}
    assert len(table) > 256 * 1024 and table.count(",") > 100_000
    answer = client.post(CHAT, json=body, headers=keyed(MINE))
    assert answer.status_code != 400, answer.text
    assert arrived(upstream)[len(before) :] == [CHAT]
    spam = '{"model": "gpt-5.5", "file_id": [' + "{}," * 100_001 + "{}]}"
    answer = client.post(
        CHAT, content=spam, headers={**keyed(MINE), "content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    assert arrived(upstream)[len(before) :] == [CHAT]


def test_a_body_python_cannot_decode_names_no_file_by_an_escaped_key(
    clients: tuple[TestClient, TestClient],
) -> None:
    """A JSON reader that takes what Python's does not (a number of 5,000 digits in a
    function's schema, objects nested past Python's recursion, a lone control character in
    a string) would read `"file\\u005fid"` as `file_id`: either its files are read, or the
    body is refused, never forwarded unread."""
    client, upstream = clients
    theirs = upload(client, THEIRS)
    before = arrived(upstream)
    schema = '{"type": "object", "maximum": ' + "9" * 5000 + "}"
    tool = '{"type": "function", "function": {"name": "f", "parameters": ' + schema + "}}"
    escaped = json.dumps(chat(theirs)).replace('"file_id"', '"file\\u005fid"')
    deep = "[" * 5000 + "]" * 5000
    bodies = [
        (escaped[:-1] + ', "tools": [' + tool + "]}", "not_found"),
        (escaped[:-1] + ', "metadata": {"note": "a\tb"}}', "not_found"),
        (escaped[:-1] + ', "x": ' + deep + "}", "invalid_request"),
    ]
    for body, code in bodies:
        answer = client.post(
            CHAT, content=body, headers={**keyed(MINE), "content-type": "application/json"}
        )
        assert arrived(upstream) == before, body[:200]
        assert answer.status_code == (404 if code == "not_found" else 400), answer.text
        assert answer.json()["error"]["code"] == code
