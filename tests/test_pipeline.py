"""The pipeline asks its door every per-door question, and nothing else differs per door:
a door that wraps the Images door and records what it is asked, plugged in process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.core.budgets import Variant
from proxy.core.errors import LedgerUnavailable, PolicyViolation
from proxy.core.models import Asked, Endpoint, ImageRequest
from proxy.core.parsing import ParsedBody
from proxy.core.settings import Config, Limits, Team
from proxy.core.settlement import Bound
from proxy.doors import AnswerMeter, ImagesDoor, StreamMeter
from proxy.ledger import Row
from proxy.web.gateway import Gateway
from proxy.web.pipeline import Pipeline
from tests.conftest import in_process, write_config

KEY = "tg_test_pipeline_key"
HEADERS = {"authorization": f"Bearer {KEY}"}
PATH = "/v1/images/generations"
BODY = {"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}


class SpyDoor:
    """The Images door, recording each question the pipeline asks it."""

    def __init__(self, refuse: bool = False, fault: bool = False) -> None:
        self.inner = ImagesDoor("generations")
        self.asked: list[str] = []
        self.refuse = refuse
        self.fault = fault

    @property
    def endpoint(self) -> Endpoint:
        return self.inner.endpoint

    @property
    def upstream_path(self) -> str:
        self.asked.append("upstream_path")
        return self.inner.upstream_path

    def body_limit(self, limits: Limits) -> int:
        self.asked.append("body_limit")
        return self.inner.body_limit(limits)

    def parse(self, content_type: str, body: bytes, config: Config, team: Team) -> ParsedBody:
        self.asked.append("parse")
        if self.fault:
            raise RuntimeError("a fault of the door's own")
        return self.inner.parse(content_type, body, config, team)

    def request(self, parsed: ParsedBody) -> ImageRequest:
        self.asked.append("request")
        return self.inner.request(parsed)

    def names_model(self, parsed: ParsedBody) -> bool:
        self.asked.append("names_model")
        return self.inner.names_model(parsed)

    def file_ids(self, parsed: ParsedBody) -> tuple[str, ...]:
        self.asked.append("file_ids")
        return self.inner.file_ids(parsed)

    def previous(self, parsed: ParsedBody) -> str | None:
        self.asked.append("previous")
        return self.inner.previous(parsed)

    def carry(self, parsed: ParsedBody, tokens: int, images: int) -> ParsedBody:
        self.asked.append("carry")
        return self.inner.carry(parsed, tokens, images)

    def digest(self, parsed: ParsedBody) -> bytes:
        self.asked.append("digest")
        return self.inner.digest(parsed)

    def injected(self, parsed: ParsedBody) -> str:
        self.asked.append("injected")
        return self.inner.injected(parsed)

    def bound(self, parsed: ParsedBody, variant: Variant) -> Bound:
        self.asked.append("bound")
        return self.inner.bound(parsed, variant)

    def admit(self, team: Team, parsed: ParsedBody, config: Config) -> Variant:
        self.asked.append("admit")
        if self.refuse:
            raise PolicyViolation("This door refuses the request.")
        return self.inner.admit(team, parsed, config)

    def encode(self, parsed: ParsedBody, variant: Variant) -> tuple[bytes, str]:
        self.asked.append("encode")
        return self.inner.encode(parsed, variant)

    def answer_meter(self) -> AnswerMeter:
        self.asked.append("answer_meter")
        return self.inner.answer_meter()

    def stream_meter(self) -> StreamMeter:
        self.asked.append("stream_meter")
        return self.inner.stream_meter()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Gateway]:
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    yield in_process(tmp_path)


def plug(app: Gateway, door: SpyDoor) -> None:
    app.images = {**app.images, PATH: Pipeline(door)}


def rows(client: TestClient, app: Gateway) -> list[Row]:
    """The ledger's rows, read on the loop the app runs on."""
    assert client.portal is not None
    return client.portal.call(app.current().ledger.rows)


def test_a_request_is_walked_through_every_question_of_its_door(app: Gateway) -> None:
    door = SpyDoor()
    plug(app, door)
    with TestClient(app) as client:
        answer = client.post(PATH, json=BODY, headers=HEADERS)
        assert answer.status_code == 200, answer.text
        [row] = rows(client, app)
    assert door.asked == [
        "body_limit",
        "parse",
        "file_ids",
        "previous",
        "request",
        "admit",
        "names_model",
        "injected",
        "encode",
        "bound",
        "upstream_path",
        "answer_meter",
    ]
    assert row.entry.endpoint == "generations"
    assert row.settlement is not None and row.settlement.outcome == "ok"
    assert row.settlement.cost_nanos == int(
        float(answer.headers["x-tollgate-cost-usd"]) * 10**9 + 0.5
    )


def test_a_streamed_request_is_metered_by_its_doors_stream_meter(app: Gateway) -> None:
    door = SpyDoor()
    plug(app, door)
    with (
        TestClient(app) as client,
        client.stream("POST", PATH, json={**BODY, "stream": True}, headers=HEADERS) as answer,
    ):
        assert answer.status_code == 200
        events = b"".join(answer.iter_bytes())
    assert b"image_generation.completed" in events
    assert "stream_meter" in door.asked
    assert "answer_meter" not in door.asked


def test_what_the_door_refuses_is_recorded_and_never_forwarded(app: Gateway) -> None:
    door = SpyDoor(refuse=True)
    plug(app, door)
    with TestClient(app) as client:
        answer = client.post(PATH, json=BODY, headers=HEADERS)
        [row] = rows(client, app)
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "policy_violation"
    assert answer.headers["x-tollgate-cost-usd"] == "0"
    assert "upstream_path" not in door.asked
    assert row.settlement is not None and row.settlement.outcome == "rejected_policy"


def test_a_body_its_door_cannot_parse_is_recorded_with_what_it_asked_and_refused_as_before(
    tmp_path: Path,
) -> None:
    """Its row records the model, quality, size, `n` and user its body asked; its answer
    says the room of the team's budget, as it did, not that of the user's budget its row
    now names (what was read of a refused body decides nothing)."""
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"""
            name: web
            keys:
              - {{id: k, sha256: {key_hash(KEY)}}}
            budgets:
              - {{period: month, limit_usd: 100}}
            per_user:
              - {{period: day, limit_usd: 2}}
        """,
    })  # fmt: skip
    app = in_process(tmp_path)
    refused = {**BODY, "n": 2, "user": "ada", "partial_images": 2}
    with TestClient(app) as client:
        answer = client.post(PATH, json=refused, headers=HEADERS)
        [row] = rows(client, app)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "partial_images"
    assert answer.headers["x-tollgate-budget-remaining-usd"] == "100"
    entry = row.entry
    assert (entry.model_requested, entry.quality_requested, entry.size_requested) == (
        "gpt-image-1",
        "low",
        "1024x1024",
    )
    assert (entry.n_requested, entry.user, entry.model) == (2, "ada", None)
    assert row.settlement is not None and row.settlement.outcome == "client_error"


class UnreadableDoor(ImagesDoor):
    """The Images door, whose reading of what a refused body asked fails."""

    def asked(self, content_type: str, body: bytes, config: Config) -> Asked:
        raise RuntimeError("a fault of the reading's own")


def test_a_fault_reading_what_a_refused_body_asked_leaves_its_refusal_as_it_was(
    app: Gateway,
) -> None:
    app.images = {**app.images, PATH: Pipeline(UnreadableDoor("generations"))}
    with TestClient(app) as client:
        answer = client.post(PATH, json={**BODY, "partial_images": 2}, headers=HEADERS)
        [row] = rows(client, app)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "partial_images"
    assert row.entry.model_requested is None
    assert row.settlement is not None and row.settlement.outcome == "client_error"


def test_a_fault_of_tollgates_own_leaves_no_request_in_flight(app: Gateway) -> None:
    """Three hostile inputs once raised out of a parse (a RecursionError, a ValueError, a
    FormParserError): each answered 500 and left one more request on the in-flight gauge,
    for good."""
    plug(app, SpyDoor(fault=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(3):
            answer = client.post(PATH, json=BODY, headers=HEADERS)
            assert answer.status_code == 500
            assert answer.json()["error"]["code"] == "internal_error"
        exposition = client.get("/metrics").text
    assert "\ntollgate_inflight_requests 0.0\n" in exposition


def test_a_batch_create_the_ledger_cannot_take_is_answered_503_and_leaves_none_in_flight(
    app: Gateway,
) -> None:
    """A batch create whose ledger fails while it is decided (its input file read, its
    reservation written) is answered as a request's is: 503, retried by the SDKs. It raised
    out of the create instead: answered 500, and one more request left on the in-flight
    gauge, for good."""

    async def unavailable(file_id: str) -> None:
        raise LedgerUnavailable("the ledger's database is unreachable")

    create = {"input_file_id": "file-x", "endpoint": "/v1/images/generations"}
    with TestClient(app, raise_server_exceptions=False) as client:
        app.current().ledger.stored = unavailable  # type: ignore[method-assign]
        answer = client.post(
            "/v1/batches", json={**create, "completion_window": "24h"}, headers=HEADERS
        )
        exposition = client.get("/metrics").text
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert answer.headers["x-tollgate-team"] == "web"
    assert "\ntollgate_inflight_requests 0.0\n" in exposition
