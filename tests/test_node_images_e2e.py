"""The Images API and the Batch API through the official openai Node SDK
(tests/node/images.mjs), as a team points its client at Tollgate and changes nothing else:
what the SDK sends (its multipart fields, its retries), what it reads back (Tollgate's
headers, its refusals), and what the ledger and the admin report charge for it.

Every cost is checked against the simulator's billing record of the request priced at
OpenAI's published rates (`tests.test_proxy_e2e.expected_cost`), not against Tollgate's
meter; a batch line against the price book's batch rates (`tests.batches_e2e`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.batches_e2e import DAY, batch_cost, billed_lines, output_tokens, settled_rows
from tests.conftest import DESIGN_KEY, Simulator, Tollgate, start_tollgate, write_config
from tests.responses_e2e import NODE_PROJECT, node_sdk
from tests.test_proxy_e2e import expected_cost, png, wait_settled

KEYS = {name: f"tg_test_{name}_node_key" for name in ("broke", "strict", "limited", "audit")}
ADMIN_TOKEN = "tg_test_node_admin_token"
AUDIT_LIMIT_USD = 100


def team(name: str, body: str = "") -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "broke": team("broke", "budgets:\n  - {period: day, limit_usd: 0.001}\non_exhausted: reject\n"),
    "strict": team(
        "strict", "allow:\n  models: [gpt-image-2, gpt-image-1.5]\n  max_quality: low\n"
    ),
    "limited": team("limited", "rate_limits:\n  - {per: day, requests: 1}\n"),
    "audit": team("audit", f"budgets:\n  - {{period: month, limit_usd: {AUDIT_LIMIT_USD}}}\n"),
}


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("node-images")
    settings = f"timezone: UTC\nadmin_token: {ADMIN_TOKEN}\n"
    write_config(root, f"{simulator.url}/v1", settings, teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def calm(simulator: Simulator) -> Iterator[None]:
    """No latency or faults; a batch ends 400 ms after it is created."""
    knobs = {"latency_ms": 0, "fault": None, "batch_delay_ms": 400, "batch_window_ms": DAY * 1000}
    simulator.configure(**knobs)
    yield
    simulator.configure(**knobs)


def node(proxy: Tollgate, *cases: str, design_key: str = DESIGN_KEY) -> dict[str, Any]:
    """The results of `cases` of images.mjs, run by node against `proxy`."""
    binary = node_sdk()
    ran = subprocess.run(
        [binary, str(NODE_PROJECT / "images.mjs")],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{proxy.url}/v1",
            "TOLLGATE_KEYS": json.dumps({**KEYS, "design": design_key}),
            "CASES": ",".join(cases),
        },
    )
    assert ran.returncode == 0, ran.stderr
    results: dict[str, Any] = json.loads(ran.stdout)
    return results


def nanos(usd: str | Decimal) -> int:
    exact = Decimal(usd) * 10**9
    assert exact == int(exact), usd
    return int(exact)


def charged(proxy: Tollgate, simulator: Simulator, got: dict[str, Any]) -> dict[str, Any]:
    """The settled row of one answered case: the price of what the simulator billed for it;
    in its `x-tollgate-cost-usd` header too, or, for a stream, within the reservation its
    `x-tollgate-reserved-usd` header announced."""
    headers = got["headers"]
    record = simulator.record(headers["x-request-id"])
    cost = nanos(expected_cost(record))
    row = wait_settled(proxy, headers["x-tollgate-request-id"])
    assert row["cost_nanos"] == cost > 0
    assert row["upstream_request_id"] == record["id"]
    assert (row["flagged"], row["held"], row["status"]) == (0, 0, 200)
    assert row["image_output_tokens"] == record["usage"]["image_output"]
    assert row["image_input_tokens"] == record["usage"]["image_input"]
    assert row["text_input_tokens"] == record["usage"]["text_input"]
    assert row["estimated_nanos"] >= row["cost_nanos"]
    if "events" in got:
        assert row["stream"] == 1
        assert headers["x-tollgate-cost-usd"] is None  # a stream's cost is known at its end
        assert nanos(headers["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
        [done] = [e for e in got["events"] if e["type"].endswith(".completed")]
        assert done["usage"]["output_tokens"] == record["usage"]["image_output"]
    else:
        assert row["stream"] == 0
        assert nanos(headers["x-tollgate-cost-usd"]) == cost
        assert (
            got["usage"]["output_tokens"] - text_output(got["usage"]) == row["image_output_tokens"]
        )
    return row


def text_output(usage: dict[str, Any]) -> int:
    found: int = (usage.get("output_tokens_details") or {}).get("text_tokens", 0)
    return found


def fields(got: dict[str, Any]) -> list[str]:
    """The multipart field names of the one request a case sent, in order."""
    [sent] = got["sent"]
    return [name for name, _ in sent["fields"]]


# -- 1. generations -------------------------------------------------------------------------


def test_node_generations_plain_several_and_default_model_are_charged_what_was_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "generate", "generate_n", "generate_default_model")
    plain = charged(proxy, simulator, got["generate"])
    assert got["generate"]["images"] == [[1024, 1024]]
    assert (plain["endpoint"], plain["model"], plain["outcome"]) == (
        "generations",
        "gpt-image-2",
        "ok",
    )
    several = charged(proxy, simulator, got["generate_n"])
    assert got["generate_n"]["images"] == [[1536, 1024], [1536, 1024]]
    assert (several["n"], several["images"], several["quality"]) == (2, 2, "medium")
    default = charged(proxy, simulator, got["generate_default_model"])
    assert got["generate_default_model"]["headers"]["x-tollgate-model"] == "gpt-image-2"
    assert default["model"] == "gpt-image-2"
    assert simulator.record(got["generate_default_model"]["headers"]["x-request-id"])["model"] == (
        "gpt-image-2"
    )
    for case in got.values():
        assert case["headers"]["x-tollgate-team"] == "design"
        assert [s["retry_count"] for s in case["sent"]] == ["0"]


def test_node_streamed_generation_passes_partials_and_settles_from_completed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "generate_stream")["generate_stream"]
    kinds = [e["type"] for e in got["events"]]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in got["events"][:2]] == [0, 1]
    row = charged(proxy, simulator, got)
    assert simulator.record(got["headers"]["x-request-id"])["stream"] is True
    assert row["image_output_tokens"] >= 200  # the two partial images are billed


def test_a_node_client_that_leaves_a_stream_early_is_charged_what_was_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(latency_ms=3000)  # a second before each of its three events
    got = node(proxy, "generate_stream_left")["generate_stream_left"]
    assert [e["type"] for e in got["events"]] == ["image_generation.partial_image"]
    record = simulator.record(got["headers"]["x-request-id"])
    row = wait_settled(proxy, got["headers"]["x-tollgate-request-id"])
    assert row["cost_nanos"] == nanos(expected_cost(record)) > 0
    assert row["image_output_tokens"] == record["usage"]["image_output"]
    assert nanos(got["headers"]["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    assert row["flagged"] == 0


def test_a_stream_the_upstream_breaks_off_fails_in_the_node_sdk_and_is_charged_its_bound(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Read from OpenAI itself, a stream whose connection breaks fails in the SDK; through
    Tollgate it must too, not end as if it were whole with no image."""
    got = node(proxy, "generate_stream_cut", "edit_stream_cut")
    partials = {"generate_stream_cut": 2, "edit_stream_cut": 1}
    for case, cut in got.items():
        assert [e.endswith(".partial_image") for e in cut["events"]] == [True] * partials[case]
        assert (cut["error"], cut["type"], cut["code"]) == (
            "APIError",
            "api_error",
            "upstream_unavailable",
        ), case
        assert "stream broke off before its end" in cut["message"]
        row = wait_settled(proxy, cut["headers"]["x-tollgate-request-id"])
        assert (row["flagged"], row["cost_nanos"]) == (1, row["estimated_nanos"])
        assert nanos(cut["headers"]["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    # The Python SDK fails the same way.
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for event in proxy.client().images.generate(
            model="gpt-image-2",
            prompt="A harbour [[fault:truncate]], streamed from Python",
            quality="low",
            size="1024x1024",
            stream=True,
            partial_images=2,
        ):
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"] * 2
    assert (caught.value.type, caught.value.code) == ("api_error", "upstream_unavailable")


# -- 2. multipart edits ----------------------------------------------------------------------


def test_node_edits_encode_one_image_as_image_and_a_list_as_repeated_image_brackets(
    proxy: Tollgate, simulator: Simulator
) -> None:
    cases = ("edit_one", "edit_one_in_a_list", "edit_several_and_mask", "edit_untyped_file")
    got = node(proxy, *cases)
    assert fields(got["edit_one"])[-1] == "image"
    assert fields(got["edit_one_in_a_list"])[-1] == "image[]"
    assert fields(got["edit_several_and_mask"])[-3:] == ["image[]", "image[]", "mask"]
    [untyped] = [v for k, v in got["edit_untyped_file"]["sent"][0]["fields"] if k == "image"]
    assert untyped["type"] == ""  # sent as application/octet-stream: read by its bytes
    counts = {"edit_one": 1, "edit_one_in_a_list": 1, "edit_several_and_mask": 2}
    for case in cases:
        row = charged(proxy, simulator, got[case])
        assert (row["endpoint"], row["outcome"]) == ("edits", "ok")
        assert simulator.record(got[case]["headers"]["x-request-id"])["image_count"] == counts.get(
            case, 1
        )
    one = wait_settled(proxy, got["edit_one"]["headers"]["x-tollgate-request-id"])
    assert one["image_input_tokens"] == 65 + 129 + 4160  # gpt-image-1, one tile, high fidelity
    assert got["edit_several_and_mask"]["images"] == [[1536, 1024]]


def test_node_streamed_edit_of_several_images_and_stream_false_are_charged_exactly(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "edit_stream", "edit_stream_false")
    streamed = got["edit_stream"]
    [sent] = streamed["sent"]
    assert ["stream", "true"] in sent["fields"] and ["partial_images", "1"] in sent["fields"]
    assert fields(streamed).count("image[]") == 2
    kinds = [e["type"] for e in streamed["events"]]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"]
    assert streamed["events"][-1]["size"] == [1024, 1536]
    row = charged(proxy, simulator, streamed)
    assert (row["model"], row["endpoint"]) == ("gpt-image-1.5", "edits")
    assert simulator.record(streamed["headers"]["x-request-id"])["image_count"] == 2
    plain = got["edit_stream_false"]
    assert ["stream", "false"] in plain["sent"][0]["fields"]
    charged(proxy, simulator, plain)  # answered as JSON, with its cost header


def test_a_node_edit_is_reserved_and_charged_as_the_same_edit_from_python(
    proxy: Tollgate, simulator: Simulator
) -> None:
    from_node = node(proxy, "edit_several_and_mask")["edit_several_and_mask"]
    raw = proxy.client().images.with_raw_response.edit(
        model="gpt-image-1.5",
        quality="medium",
        size="1536x1024",
        prompt="Merge them, from Node",  # the same bytes: the same bound
        image=[("a.png", png(1024, 1024), "image/png"), ("b.png", png(1536, 1024), "image/png")],
        mask=("mask.png", png(1024, 1024, alpha=True), "image/png"),
    )
    node_row = charged(proxy, simulator, from_node)
    python_row = wait_settled(proxy, raw.headers["x-tollgate-request-id"])
    for column in ("estimated_nanos", "cost_nanos", "image_input_tokens", "image_output_tokens"):
        assert node_row[column] == python_row[column], column


def test_node_edits_of_files_read_from_disk_are_charged_as_the_same_bytes_uploaded(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """`fs.createReadStream` uploads: the SDK reads each file whole before it sends (and
    before any retry), so the edit is priced from the files' real dimensions."""
    got = node(proxy, "edit_read_streams", "edit_several_and_mask", "edit_read_stream_streamed")
    from_disk, from_buffers = got["edit_read_streams"], got["edit_several_and_mask"]
    # The SDK appends each file part as its stream is read: their order may vary.
    assert sorted(fields(from_disk)[-3:]) == ["image[]", "image[]", "mask"]
    sent = {name: value for name, value in from_disk["sent"][0]["fields"] if name == "mask"}
    assert sent["mask"]["filename"] == "mask.png"
    disk_row = charged(proxy, simulator, from_disk)
    buffer_row = charged(proxy, simulator, from_buffers)
    for column in ("estimated_nanos", "image_input_tokens", "image_output_tokens", "cost_nanos"):
        assert disk_row[column] == buffer_row[column], column
    assert simulator.record(from_disk["headers"]["x-request-id"])["image_count"] == 2
    streamed = got["edit_read_stream_streamed"]
    kinds = [e["type"] for e in streamed["events"]]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"]
    assert fields(streamed)[-1] == "image"
    charged(proxy, simulator, streamed)


def test_a_node_variation_is_priced_per_image(proxy: Tollgate, simulator: Simulator) -> None:
    got = node(proxy, "variation")["variation"]
    assert fields(got) == ["model", "image", "n", "size", "response_format"]
    assert got["images"] == [[256, 256], [256, 256]]
    row = wait_settled(proxy, got["headers"]["x-tollgate-request-id"])
    price = 2 * nanos("0.016")  # DALL-E 2's published price of a 256x256 image
    assert row["cost_nanos"] == nanos(got["headers"]["x-tollgate-cost-usd"]) == price
    # No usage in a DALL-E answer: charged its price, flagged for reconciliation (SPEC 5).
    assert (row["endpoint"], row["images"], row["flagged"]) == ("variations", 2, 1)
    assert simulator.record(got["headers"]["x-request-id"])["images"] == 2


# -- 3. files and batches ------------------------------------------------------------------


def test_node_files_and_a_batch_run_to_completion_are_settled_line_by_line(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "file_vision", "batch_completed")
    vision = got["file_vision"]
    assert (vision["purpose"], vision["headers"]["x-tollgate-team"]) == ("vision", "design")
    assert fields(vision) == ["file", "purpose"]
    assert (
        httpx.get(  # the file is the team's own: another team cannot read it
            f"{proxy.url}/v1/files/{vision['id']}",
            headers={"authorization": f"Bearer {KEYS['audit']}"},
        ).status_code
        == 404
    )
    done = got["batch_completed"]
    assert done["file"]["purpose"] == "batch"
    batch = done["ended"]
    assert batch["status"] == "completed"
    reserved = nanos(done["created"]["headers"]["x-tollgate-reserved-usd"])
    rows = settled_rows(proxy, batch["id"])
    records = billed_lines(simulator, batch["id"])
    assert sorted(r["custom_id"] for r in rows) == sorted(records) == ["node-1", "node-2"]
    by_line = {o["custom_id"]: o["usage"] for o in done["output"]}
    for row in rows:
        cost = batch_cost("gpt-image-2", output_tokens(by_line[row["custom_id"]]))
        assert row["cost_nanos"] == cost > 0
        assert row["image_output_tokens"] == records[row["custom_id"]]["usage"]["image_output"]
        assert (row["endpoint"], row["held"], row["reserved_nanos"]) == ("batches", 0, 0)
    assert sum(r["cost_nanos"] for r in rows) <= reserved


def test_node_lists_of_batches_and_files_page_through_the_teams_own(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "batch_listed")["batch_listed"]
    assert got["batches"][:3] == got["ids"][::-1]  # newest first
    assert len(set(got["batches"])) == len(got["batches"])
    python = proxy.client()
    assert got["batches"] == [b.id for b in python.batches.list(limit=100)]
    assert len(set(got["files"])) == len(got["files"]) >= 3
    pages = [s for s in got["sent"] if "/batches?" in s["url"] or s["url"].endswith("/batches")]
    assert len([s for s in pages if s["method"] == "GET"]) >= len(got["batches"])
    assert got["waited"] == "processed"
    assert got["deleted"]["deleted"] is True
    assert (got["gone"]["error"], got["gone"]["status"]) == ("NotFoundError", 404)
    # Another team lists none of them.
    other = proxy.client(KEYS["audit"])
    assert not set(got["ids"]) & {b.id for b in other.batches.list(limit=100)}


def test_a_node_batch_cancelled_while_it_runs_releases_its_reservation(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=60_000)  # still running when it is cancelled
    got = node(proxy, "batch_cancelled")["batch_cancelled"]
    assert got["cancelled"]["object_status"] in ("cancelling", "cancelled")
    assert got["ended"]["status"] == "cancelled"
    [row] = settled_rows(proxy, got["ended"]["id"])
    assert (row["cost_nanos"], row["reserved_nanos"], row["error_code"]) == (
        0,
        0,
        "batch_cancelled",
    )
    assert row["estimated_nanos"] == nanos(got["created"]["headers"]["x-tollgate-reserved-usd"])


# -- 4. refusals and Tollgate's headers ------------------------------------------------------


def test_node_sdk_does_not_retry_a_budget_refusal(proxy: Tollgate, simulator: Simulator) -> None:
    got = node(proxy, "budget_exceeded", "budget_exceeded_stream", "budget_exceeded_batch")
    for case, refused in got.items():
        assert refused["error"] == "RateLimitError", case
        assert (refused["status"], refused["type"], refused["code"]) == (
            429,
            "insufficient_quota",
            "budget_exceeded",
        )
        assert refused["headers"]["x-should-retry"] == "false"
        attempts = [s for s in refused["sent"] if s["url"].endswith(("/generations", "/edits",
                                                                     "/batches"))]  # fmt: skip
        assert [a["retry_count"] for a in attempts] == ["0"], case  # maxRetries: 2, unused
        row = proxy.row(refused["headers"]["x-tollgate-request-id"])
        assert (row["outcome"], row["status"], row["cost_nanos"]) == ("rejected_budget", 429, 0)
    rejected = proxy.query("SELECT * FROM requests WHERE team = 'broke'")
    assert len(rejected) == 3  # one row per request: nothing retried
    assert [r["upstream_request_id"] for r in rejected] == [None] * 3  # none went upstream


def test_node_sdk_raises_each_of_tollgates_refusals_as_its_error_class(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "refusals")["refusals"]
    invalid = "invalid_request_error"
    expected = {
        "invalid_size": ("BadRequestError", 400, invalid, "invalid_request", "size"),
        "no_prompt": ("BadRequestError", 400, invalid, "invalid_request", "prompt"),
        "unpriced": ("BadRequestError", 400, invalid, "unpriced_model", "model"),
        "unknown_key": ("AuthenticationError", 401, invalid, "invalid_api_key", None),
        "not_proxied": ("NotFoundError", 404, invalid, "not_found", None),
        "too_large": ("APIError", 413, invalid, "request_too_large", None),
    }
    for case, (error, status, kind, code, param) in expected.items():
        found = got[case]
        assert (found["error"], found["status"], found["type"], found["code"]) == (
            error,
            status,
            kind,
            code,
        ), case
        assert found["param"] == param, case
    for case in ("invalid_size", "no_prompt", "unpriced", "too_large"):
        headers = got[case]["headers"]
        assert (headers["x-tollgate-team"], headers["x-tollgate-cost-usd"]) == ("design", "0")
        assert headers["x-tollgate-request-id"].startswith("tg_req_")
    # Each was sent once (none is retried) and none reached the upstream.
    assert [s["retry_count"] for s in got["sent"]] == ["0"] * len(expected)
    for case in ("invalid_size", "no_prompt", "unpriced", "too_large"):
        row = wait_settled(proxy, got[case]["headers"]["x-tollgate-request-id"])
        assert (row["cost_nanos"], row["upstream_request_id"]) == (0, None), case


def test_node_sdk_reads_a_policy_refusal_and_a_downgrade(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "policy", "downgraded", "downgraded_stream")
    policy = got["policy"]
    assert (policy["error"], policy["status"], policy["code"], policy["param"]) == (
        "PermissionDeniedError",
        403,
        "policy_violation",
        "model",
    )
    assert len(policy["sent"]) == 1
    assert proxy.row(policy["headers"]["x-tollgate-request-id"])["outcome"] == "rejected_policy"
    for case in ("downgraded", "downgraded_stream"):
        answer = got[case]
        assert answer["headers"]["x-tollgate-downgraded"] == "quality=high->low"
        row = charged(proxy, simulator, answer)
        assert (row["quality_requested"], row["quality"], row["outcome"]) == (
            "high",
            "low",
            "downgraded",
        )
        assert simulator.record(answer["headers"]["x-request-id"])["quality"] == "low"


def test_node_sdk_does_not_wait_out_a_rate_limit_that_lasts_until_tomorrow(
    proxy: Tollgate, simulator: Simulator
) -> None:
    # This SDK waits out any `Retry-After`, however long: only `x-should-retry: false`
    # stops it retrying.
    got = node(proxy, "rate_limited")["rate_limited"]
    charged(proxy, simulator, got["first"])
    second = got["second"]
    assert (second["error"], second["status"], second["code"]) == (
        "RateLimitError",
        429,
        "rate_limit_exceeded",
    )
    assert int(second["headers"]["retry-after"]) > 120
    assert second["headers"]["x-should-retry"] == "false"
    assert [s["retry_count"] for s in got["sent"]] == ["0", "0"]  # one attempt each
    rows = proxy.query("SELECT * FROM requests WHERE team = 'limited' ORDER BY started_at")
    assert [r["status"] for r in rows] == [200, 429]


def test_node_sdk_with_an_idempotency_key_is_replayed_and_a_conflict_is_not_retried(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "idempotency_key")["idempotency_key"]
    assert {s["idempotency_key"] for s in got["sent"]} != {None}  # as the team set it
    first = charged(proxy, simulator, got["first"])
    again = got["again"]
    assert again["headers"]["x-tollgate-replay-of"] == first["id"]
    assert again["headers"]["x-request-id"] == got["first"]["headers"]["x-request-id"]
    assert again["headers"]["x-tollgate-cost-usd"] == "0"
    replay = proxy.row(again["headers"]["x-tollgate-request-id"])
    assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)
    conflict = got["conflict"]
    assert (conflict["status"], conflict["code"]) == (409, "idempotency_conflict")
    assert conflict["headers"]["x-should-retry"] == "false"
    assert [s["retry_count"] for s in got["sent"]] == ["0", "0", "0"]  # the 409 not retried


# -- 5. the report ---------------------------------------------------------------------------


def test_the_admin_report_and_budget_of_a_node_team_are_what_the_simulator_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    # The streams last: each is settled after its last event, as the next request arrives.
    cases = ("generate", "generate_n", "edit_one", "generate_stream", "edit_stream")
    got = node(proxy, *cases, design_key=KEYS["audit"])
    records = [simulator.record(got[c]["headers"]["x-request-id"]) for c in cases]
    rows = [wait_settled(proxy, got[c]["headers"]["x-tollgate-request-id"]) for c in cases]
    answer = httpx.get(
        f"{proxy.url}/admin/report",
        params={"by": "team", "format": "json"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    [row] = [r for r in answer.json()["rows"] if r["team"] == "audit"]
    assert row["requests"] == len(cases)
    assert row["images"] == sum(r["images"] for r in records)
    assert row["image_output_tokens"] == sum(r["usage"]["image_output"] for r in records)
    assert row["image_input_tokens"] == sum(r["usage"]["image_input"] for r in records)
    assert Decimal(row["cost_usd"]) == sum(expected_cost(r) for r in records)
    # What the budget has left, as each answer told the client: the limit less what was
    # billed so far (and, for the first stream, less what it reserved).
    spent = 0
    for case, record in zip(cases[:3], records[:3], strict=True):
        spent += nanos(expected_cost(record))
        remaining = got[case]["headers"]["x-tollgate-budget-remaining-usd"]
        assert nanos(remaining) == AUDIT_LIMIT_USD * 10**9 - spent, case
    stream_left = got["generate_stream"]["headers"]["x-tollgate-budget-remaining-usd"]
    assert nanos(stream_left) == AUDIT_LIMIT_USD * 10**9 - spent - rows[3]["estimated_nanos"]
