"""The simulated Files and Batch APIs (image batches), driven by the official openai SDK
over loopback; and, with time passed in, the day a batch's spend is booked on."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import httpx
import openai
import pytest
from openai.types import Batch, FileObject
from PIL import Image
from starlette.datastructures import QueryParams

from proxy.core.models import InputImage
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.simulator.batch_lines import BatchInput, read_input, run_line
from proxy.simulator.batches import BatchStore, StoredBatch
from proxy.simulator.billing import BillingRecord
from proxy.simulator.costs import costs_page
from proxy.simulator.files import MAX_BATCH_FILE_BYTES, FileStore, check_upload
from proxy.simulator.refusals import ApiError
from proxy.simulator.tokens import formula_tokens, images_input_tokens, text_tokens
from tests.conftest import serving

API_KEY = "sk-sim-test-key-0004"
GENERATIONS: Final = "/v1/images/generations"
EDITS: Final = "/v1/images/edits"
LOW: dict[str, Any] = {
    "model": "gpt-image-2",
    "quality": "low",
    "size": "1024x1024",
    "output_format": "webp",
}
LOW_1024 = formula_tokens(16, 1024, 1024)
DAY = 86_400


@dataclass
class Sim:
    http: httpx.Client
    client: openai.OpenAI

    def configure(self, **knobs: Any) -> None:
        self.http.post("/_sim/config", json=knobs).raise_for_status()

    def billing(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.http.get("/_sim/billing").json()["requests"]
        return requests

    def upload(self, lines: list[dict[str, Any]] | list[str], name: str = "in.jsonl") -> FileObject:
        text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        return self.client.files.create(file=(name, text.encode()), purpose="batch")

    def batch(
        self, lines: list[dict[str, Any]], endpoint: Any = GENERATIONS, **extra: Any
    ) -> Batch:
        uploaded = self.upload(lines)
        return self.client.batches.create(
            input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **extra
        )

    def wait(self, batch_id: str, seen: list[str] | None = None, timeout: float = 10) -> Batch:
        """The batch once it has ended, polling every 10 ms (statuses seen in `seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.client.batches.retrieve(batch_id)
            if seen is not None and (not seen or seen[-1] != batch.status):
                seen.append(batch.status)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
            assert time.monotonic() < deadline, f"batch still {batch.status}"
            time.sleep(0.01)

    def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        text = self.client.files.content(file_id).text
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_simulator_app(SimulatorSettings(api_key=API_KEY))) as url:
        yield url


@pytest.fixture
def sim(server: str) -> Iterator[Sim]:
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        http.post(
            "/_sim/config",
            json={"fault": None, "batch_delay_ms": 100, "batch_window_ms": DAY * 1000},
        ).raise_for_status()
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        with client:
            yield Sim(http, client)


def line(custom_id: str, body: dict[str, Any], url: str = GENERATIONS) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# Files


def test_an_uploaded_batch_file_can_be_retrieved_read_listed_and_deleted(sim: Sim) -> None:
    uploaded = sim.upload([line("a", {**LOW, "prompt": "a cat"})])
    assert (uploaded.purpose, uploaded.filename, uploaded.status) == (
        "batch",
        "in.jsonl",
        "processed",
    )
    assert uploaded.id.startswith("file-") and uploaded.expires_at == uploaded.created_at + 30 * DAY
    assert sim.client.files.retrieve(uploaded.id) == uploaded
    content = sim.client.files.content(uploaded.id).text
    assert json.loads(content)["custom_id"] == "a" and uploaded.bytes == len(content)
    deleted = sim.client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError, match="No such File object"):
        sim.client.files.retrieve(uploaded.id)


def test_files_are_listed_newest_first_by_cursor_pages_and_filtered_by_purpose(sim: Sim) -> None:
    batch_files = [sim.upload([line(str(i), LOW)], name=f"{i}.jsonl").id for i in range(5)]
    vision = sim.client.files.create(file=("cat.png", b"\x89PNG..."), purpose="vision")
    user = sim.client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    assert vision.expires_at is None and user.expires_at is None
    listed = [f.id for f in sim.client.files.list(limit=2)]
    assert listed == [user.id, vision.id, *reversed(batch_files)]
    assert [
        f.id for f in sim.client.files.list(purpose="batch", order="asc", limit=3)
    ] == batch_files
    first = sim.client.files.list(purpose="batch", limit=2)
    assert first.has_more and [f.id for f in first.data] == [batch_files[4], batch_files[3]]
    assert [f.id for f in sim.client.files.list(purpose="vision")] == [vision.id]


def test_an_upload_is_refused_as_openai_refuses_it(sim: Sim) -> None:
    with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
        sim.client.files.create(file=("in.txt", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="Supported values are"):
        sim.client.files.create(file=("in.jsonl", b"{}\n"), purpose="bogus")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="keeps only files with purpose"):
        sim.client.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match=r"expires_after\.seconds"):
        sim.client.files.create(
            file=("in.jsonl", b"{}\n"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    kept = sim.client.files.create(
        file=("in.jsonl", b"{}\n"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert kept.expires_at == kept.created_at + 7200


def test_a_batch_file_over_200_mb_is_refused_at_upload() -> None:
    check_upload("batch", "big.jsonl", MAX_BATCH_FILE_BYTES)
    with pytest.raises(ApiError, match="200 MB"):
        check_upload("batch", "big.jsonl", MAX_BATCH_FILE_BYTES + 1)
    check_upload("user_data", "big.bin", MAX_BATCH_FILE_BYTES + 1)


def test_a_file_of_malformed_lines_uploads_and_its_lines_are_checked_by_the_batch(
    sim: Sim,
) -> None:
    assert sim.upload(["not json"]).purpose == "batch"
    assert problems_of(b"not json\n") == [("invalid_json_line", 1)]
    many = "".join(json.dumps(line(str(i), LOW)) + "\n" for i in range(50_001)).encode()
    assert problems_of(many) == [("too_many_tasks", None)]
    assert problems_of(b"\n\n") == [("empty_file", None)]


def problems_of(content: bytes) -> list[tuple[str, int | None]]:
    read = read_input(content, GENERATIONS)
    assert isinstance(read, list)
    return [(p.code, p.line) for p in read]


# Batches


def test_a_batch_goes_through_openais_statuses_and_answers_each_line_with_exact_usage(
    sim: Sim,
) -> None:
    sim.configure(batch_delay_ms=1500)
    prompts = ["a lighthouse at dusk", "two cats", "a red fox in snow"]
    lines = [line(f"gen-{i}", {**LOW, "prompt": p, "n": i + 1}) for i, p in enumerate(prompts)]
    created = sim.batch(lines, metadata={"team": "art"})
    assert (created.status, created.endpoint, created.model) == (
        "validating",
        GENERATIONS,
        "gpt-image-2",
    )
    assert created.metadata == {"team": "art"} and created.completion_window == "24h"
    assert created.request_counts is not None and created.request_counts.total == 0
    seen: list[str] = []
    batch = sim.wait(created.id, seen)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (3, 3)
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + DAY
    assert batch.cancelled_at is None and batch.failed_at is None and batch.expired_at is None
    out = sim.lines(batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["gen-0", "gen-1", "gen-2"]
    for i, (output, prompt) in enumerate(zip(out, prompts, strict=True)):
        assert output["id"].startswith("batch_req_") and output["error"] is None
        response = output["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert len(body["data"]) == i + 1
        assert decoded(body["data"][0]["b64_json"]).size == (1024, 1024)
        text = text_tokens(prompt) * (i + 1)  # the prompt is billed for every image
        assert body["usage"] == {
            "input_tokens": text,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens": LOW_1024 * (i + 1),
            "total_tokens": text + LOW_1024 * (i + 1),
        }
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(text_tokens(p) * (i + 1) for i, p in enumerate(prompts))
    assert batch.usage.output_tokens == LOW_1024 * 6
    assert batch.output_file_id is not None
    assert sim.client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_an_edits_batch_bills_its_reference_images_as_a_direct_json_edit_would(sim: Sim) -> None:
    reference = sim.client.files.create(file=("cat.png", b"\x89PNG..."), purpose="vision")
    body = {
        **LOW,
        "model": "gpt-image-2.5-sunburst",
        "prompt": "make it blue",
        "images": [{"file_id": reference.id}, {"image_url": "https://example.com/a.png"}],
    }
    batch = sim.wait(sim.batch([line("edit-1", body, EDITS)], endpoint=EDITS).id)
    [output] = sim.lines(batch.output_file_id)
    usage = output["response"]["body"]["usage"]
    images = images_input_tokens((InputImage(), InputImage()), high_fidelity=True)
    assert usage["input_tokens_details"] == {
        "text_tokens": text_tokens("make it blue"),
        "image_tokens": images,
    }
    assert usage["output_tokens"] == formula_tokens(16, 1024, 1024)
    [entry] = sim.billing()
    assert (entry["endpoint"], entry["image_count"], entry["custom_id"]) == ("edits", 2, "edit-1")


def test_a_line_the_images_api_would_refuse_or_fail_is_an_error_line_and_not_billed(
    sim: Sim,
) -> None:
    lines = [
        line("ok", {**LOW, "prompt": "a cat"}),
        line("bad-size", {**LOW, "prompt": "a cat", "size": "1000x1000"}),
        line("server", {**LOW, "prompt": "a cat [[fault:500]]"}),
        line("moderated", {**LOW, "prompt": "a forbidden cat"}),
        line("streamed", {**LOW, "prompt": "a cat", "stream": True}),
    ]
    batch = sim.wait(sim.batch(lines).id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 4)
    assert [o["custom_id"] for o in sim.lines(batch.output_file_id)] == ["ok"]
    errors = {e["custom_id"]: e for e in sim.lines(batch.error_file_id)}
    assert all(e["error"] is None for e in errors.values())
    statuses = {k: e["response"]["status_code"] for k, e in errors.items()}
    assert statuses == {"bad-size": 400, "server": 500, "moderated": 400, "streamed": 400}
    bad_size = errors["bad-size"]["response"]["body"]["error"]
    assert (bad_size["type"], bad_size["param"]) == ("invalid_request_error", "size")
    assert errors["server"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["moderated"]["response"]["body"]["error"]["code"] == "moderation_blocked"
    billed = [e for e in sim.billing() if e["billed"]]
    assert [e["custom_id"] for e in billed] == ["ok"]
    assert {e["custom_id"]: e["status"] for e in sim.billing()}["server"] == 500


def test_a_file_openai_would_not_run_fails_the_batch_with_every_problem_by_line(
    sim: Sim,
) -> None:
    lines = [
        json.dumps(line("a", {**LOW, "prompt": "x"})),
        "{not json",
        json.dumps(line("a", {**LOW, "prompt": "x"})),
        json.dumps(line("b", {**LOW, "prompt": "x"}, url=EDITS)),
        json.dumps(line("c", {**LOW, "prompt": "x", "model": "gpt-image-1.5"})),
        json.dumps({"custom_id": "d", "method": "POST", "url": GENERATIONS}),
    ]
    uploaded = sim.upload(lines)
    created = sim.client.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )
    assert created.status == "validating"
    batch = sim.wait(created.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.in_progress_at is None and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data is not None
    found = [(e.code, e.line, e.param) for e in batch.errors.data]
    assert found == [
        ("invalid_json_line", 2, None),
        ("duplicate_custom_id", 3, "custom_id"),
        ("url_mismatch", 4, "url"),
        ("model_mismatch", 5, "body.model"),
        ("missing_required_parameter", 6, "body"),
    ]
    assert sim.billing() == []


@pytest.mark.parametrize("model", ["gpt-image-2.6-sunburst", "gpt-image-2.6-flare", "dall-e-3"])
def test_a_model_the_batch_api_does_not_accept_fails_the_batch(sim: Sim, model: str) -> None:
    batch = sim.wait(sim.batch([line("a", {**LOW, "model": model, "prompt": "x"})]).id)
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    [error] = batch.errors.data
    assert (error.code, error.line) == ("unsupported_model", 1)
    assert model in (error.message or "")


def test_batch_parameters_are_checked_at_creation(sim: Sim) -> None:
    uploaded = sim.upload([line("a", {**LOW, "prompt": "x"})])
    create = sim.client.batches.create
    with pytest.raises(openai.BadRequestError, match="only image and Responses batches"):
        create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="Supported values are"):
        create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="'24h'"):
        create(input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        create(input_file_id="file-nope", endpoint=GENERATIONS, completion_window="24h")
    notes = sim.client.files.create(file=("notes.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        create(input_file_id=notes.id, endpoint=GENERATIONS, completion_window="24h")
    with pytest.raises(openai.NotFoundError, match="No batch found"):
        sim.client.batches.retrieve("batch_nope")


def test_batches_are_listed_newest_first_by_cursor_pages(sim: Sim) -> None:
    made = [sim.batch([line("a", {**LOW, "prompt": f"cat {i}"})]).id for i in range(5)]
    listed = [b.id for b in sim.client.batches.list(limit=2)]
    assert listed == list(reversed(made))
    page = sim.client.batches.list(limit=2, after=made[3])
    assert [b.id for b in page.data] == [made[2], made[1]] and page.has_more


def test_output_files_expire_as_output_expires_after_asks(sim: Sim) -> None:
    batch = sim.wait(
        sim.batch(
            [line("a", {**LOW, "prompt": "x"})],
            output_expires_after={"anchor": "created_at", "seconds": 3600},
        ).id
    )
    assert batch.output_file_id is not None
    output = sim.client.files.retrieve(batch.output_file_id)
    assert output.expires_at == output.created_at + 3600
    assert output.filename == f"{batch.id}_output.jsonl"


def test_a_cancelled_batch_bills_and_outputs_only_the_lines_finished_before_the_cancel(
    sim: Sim,
) -> None:
    sim.configure(batch_delay_ms=1000)
    lines = [line(f"l{i}", {**LOW, "prompt": f"cat {i}"}) for i in range(10)]
    created = sim.batch(lines)
    time.sleep(0.5)
    cancelling = sim.client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert sim.client.batches.cancel(created.id).status == "cancelling"
    batch = sim.wait(created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.completed_at is None and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 0 < done < 10 and batch.request_counts.failed == 0
    out = sim.lines(batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"l{i}" for i in range(done)]
    assert batch.error_file_id is None
    billed = [e for e in sim.billing() if e["billed"]]
    assert [e["custom_id"] for e in billed] == [o["custom_id"] for o in out]
    assert {e["time"] for e in billed} == {billed[0]["time"]}
    assert int(billed[0]["time"]) == batch.cancelled_at
    with pytest.raises(openai.ConflictError, match="status 'cancelled'"):
        sim.client.batches.cancel(created.id)


def test_a_batch_past_its_completion_window_expires_with_its_finished_lines_billed(
    sim: Sim,
) -> None:
    sim.configure(batch_delay_ms=1000, batch_window_ms=500)
    lines = [line(f"l{i}", {**LOW, "prompt": f"cat {i}"}) for i in range(10)]
    batch = sim.wait(sim.batch(lines).id)
    assert batch.status == "expired" and batch.expired_at == batch.expires_at
    assert batch.finalizing_at is None and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 0 < done < 10 and batch.request_counts.failed == 10 - done
    assert len(sim.lines(batch.output_file_id)) == done
    expired = sim.lines(batch.error_file_id)
    assert [e["custom_id"] for e in expired] == [f"l{i}" for i in range(done, 10)]
    assert all(e["response"] is None for e in expired)
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}
    assert len([e for e in sim.billing() if e["billed"]]) == done
    with pytest.raises(openai.ConflictError):
        sim.client.batches.cancel(batch.id)


def test_a_thousand_line_batch_runs_quickly(sim: Sim) -> None:
    lines = [line(f"l{i}", {**LOW, "prompt": f"cat number {i}"}) for i in range(1000)]
    started = time.monotonic()
    batch = sim.wait(sim.batch(lines).id)
    out = sim.lines(batch.output_file_id)
    assert time.monotonic() - started < 20
    assert batch.request_counts is not None and batch.request_counts.completed == 1000
    assert len(out) == 1000 and len(sim.billing()) == 1000
    assert batch.usage is not None
    assert batch.usage.output_tokens == 1000 * LOW_1024


# Billing and costs


def test_batch_lines_are_billed_at_half_the_rates_as_batch_api_line_items(server: str) -> None:
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        knobs = {"fault": None, "batch_delay_ms": 50, "batch_window_ms": DAY * 1000}
        http.post("/_sim/config", json=knobs).raise_for_status()
    client = openai.OpenAI(
        base_url=f"{server}/v1",
        api_key=API_KEY,
        admin_api_key=API_KEY,
        project="proj_art",
        max_retries=0,
    )
    with client, httpx.Client(base_url=server) as http:
        sim = Sim(http, client)
        prompt = "a sunburst over the sea"
        body = {**LOW, "model": "gpt-image-2.5-sunburst", "prompt": prompt, "n": 2}
        batch = sim.wait(sim.batch([line("a", body), line("b", body)]).id)
        [first, second] = sim.billing()
        assert first["batch_id"] == batch.id and first["headers"]["openai-project"] == "proj_art"
        assert (first["custom_id"], second["custom_id"]) == ("a", "b")
        assert int(first["time"]) == batch.completed_at
        page = client.admin.organization.usage.costs(
            start_time=int(time.time()) - 3600, group_by=["line_item", "project_id"], limit=1
        )
        found = {}
        for result in page.data[0].results:
            assert result.object == "organization.costs.result" and result.amount is not None
            found[result.line_item, result.project_id] = (result.amount.value, result.quantity)
    image = 2 * 2 * LOW_1024  # two lines of n=2, at gpt-image-2.5's low quality
    text = 2 * 2 * text_tokens(prompt)  # the prompt is billed for each image
    assert found == {
        ("batch api | gpt-image-2.5-sunburst image", "proj_art"): (
            float(Decimal("15.00") * image / 1_000_000),
            image,
        ),
        ("batch api | gpt-image-2.5-sunburst text", "proj_art"): (
            float(Decimal("2.50") * text / 1_000_000),
            text,
        ),
    }


def test_batch_spend_is_booked_on_the_utc_day_the_batch_ended() -> None:
    midnight = 1_796_342_400  # 2026-12-04T00:00:00Z
    created = midnight - 0.5
    read = read_input(json.dumps(line("a", {**LOW, "prompt": "late"})).encode(), GENERATIONS)
    assert isinstance(read, BatchInput)
    batch = StoredBatch(
        "batch_late",
        "file-in",
        GENERATIONS,
        created_at=created,
        delay=2.0,
        window=DAY,
        model=read.model,
        problems=(),
        results=tuple(run_line(li) for li in read.lines),
    )
    store, record, files = BatchStore(), BillingRecord(), FileStore()
    store.put(batch)
    store.settle(midnight + 1.0, record, files)
    assert record.entries() == () and batch.status(midnight + 1.0) == "in_progress"
    store.settle(midnight + 1.5, record, files)
    [entry] = record.entries()
    assert entry.time == midnight + 1.5 and entry.batch_id == "batch_late"
    assert batch.to_json(midnight + 2)["completed_at"] == midnight + 1
    query = QueryParams(
        {
            "start_time": str(midnight - DAY),
            "end_time": str(midnight + DAY),
            "group_by": "line_item",
        }
    )
    page = costs_page(record.entries(), query, now=midnight + DAY)
    before, after = page["data"]
    assert before["results"] == []
    assert {r["line_item"] for r in after["results"]} == {
        "batch api | gpt-image-2 image",
        "batch api | gpt-image-2 text",
    }
    [image] = [r for r in after["results"] if r["line_item"].endswith("image")]
    assert image["amount"]["value"] == float(Decimal("15.00") * LOW_1024 / 1_000_000)


def test_a_batchs_output_file_is_dated_while_it_finalized_before_it_completed() -> None:
    """OpenAI makes a batch's files while it finalizes: their `created_at` is before the
    batch's `completed_at` (a minute before here), not at it."""
    created = 1_796_342_400.0
    read = read_input(json.dumps(line("a", {**LOW, "prompt": "dated"})).encode(), GENERATIONS)
    assert isinstance(read, BatchInput)
    batch = StoredBatch(
        "batch_dated",
        "file-in",
        GENERATIONS,
        created_at=created,
        delay=600.0,
        window=DAY,
        model=read.model,
        problems=(),
        results=tuple(run_line(li) for li in read.lines),
    )
    store, files = BatchStore(), FileStore()
    store.put(batch)
    store.settle(created + 600, BillingRecord(), files)
    shown = batch.to_json(created + 600)
    assert shown["status"] == "completed" and shown["completed_at"] == created + 600
    output = files.get(shown["output_file_id"], None)
    assert output.created_at == shown["finalizing_at"] == created + 540
