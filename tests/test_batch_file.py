"""A batch input file read line by line (`proxy.doors.batches`), pure: every line priced
at batch rates and written out from its parse, every bad line listed with its number."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import InvalidRequest, PolicyViolation
from proxy.core.models import Estimate, Usage
from proxy.core.parsing import parse_request
from proxy.core.pricing import estimate
from proxy.core.settings import Allow, Config
from proxy.doors import batches
from proxy.doors.batches import MAX_CUSTOM_ID, MAX_LINES, MAX_PROBLEMS, BatchFile, bound_now
from proxy.ledger import BatchLine
from tests.conftest import team_named, two_teams

GENERATIONS = "/v1/images/generations"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return two_teams(
        tmp_path_factory.mktemp("batch-file"),
        "allow:\n  max_quality: medium\n  models: [gpt-image-2]\n",
    )


def line(custom_id: str, url: str = GENERATIONS, **body: Any) -> bytes:
    fields = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", **body}
    request = {"custom_id": custom_id, "method": "POST", "url": url, "body": fields}
    return json.dumps(request).encode()


def read(
    config: Config, data: bytes, who: str = "design", step: int = 0
) -> tuple[BatchFile, bytes]:
    batch = BatchFile(team_named(config, who), config)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    out = b"".join(batch.feed(chunk) for chunk in chunks) + batch.finish()
    return batch, out


def test_each_line_is_priced_at_the_models_batch_rates(config: Config) -> None:
    data = b"\n".join(line(f"r{i}", size="1024x1024") for i in range(3)) + b"\n"
    batch, out = read(config, data)
    assert batch.ok and batch.endpoint == "generations" and len(batch.lines) == 3
    model = config.prices.find("gpt-image-2")
    assert model is not None and model.accepts_batch
    body = json.dumps(json.loads(line("x", size="1024x1024"))["body"]).encode()
    one = parse_request("generations", "application/json", body, config.default_model)
    bound = estimate(model.for_batch(), one.request)
    assert [priced.bound_nanos for priced in batch.lines] == [bound.cost_nanos] * 3
    assert batch.bound_nanos == 3 * bound.cost_nanos
    assert bound.cost_nanos * 2 == estimate(model, one.request).cost_nanos  # half price
    written = [json.loads(x) for x in out.splitlines()]
    assert [w["custom_id"] for w in written] == ["r0", "r1", "r2"]
    assert written[0]["body"]["model"] == "gpt-image-2"
    assert written[0]["url"] == GENERATIONS and written[0]["method"] == "POST"


def test_every_bad_line_is_listed_with_its_number(config: Config) -> None:
    data = b"\n".join(
        [
            line("ok"),
            b"not json",
            line("ok"),
            line("a", url="/v1/chat/completions"),
            line("b", model="gpt-image-2.6-flare"),
            line("c", model="gpt-image-9"),
            line("d", quality="ultra"),
            line("e", stream=True),
            b"",
            line("f", url="/v1/images/edits", images=[{"file_id": "file_1"}]),
            json.dumps(
                {"custom_id": "g", "method": "GET", "url": GENERATIONS, "body": {}}
            ).encode(),
            line("h", extra=1),
        ]
    )
    batch, _ = read(config, data)
    assert not batch.ok
    numbers = [p.split(":")[0] for p in batch.problems]
    assert numbers == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    text = batch.report()
    assert "line 3: custom_id 'ok' is used by an earlier line" in text
    assert "gpt-image-2.6-flare" in text and "Batch API" in text
    assert "differs from the file's first line" in text


def test_a_line_naming_a_model_its_endpoint_does_not_take_is_refused(config: Config) -> None:
    """A batch line goes through the Images API's check of the price book's `endpoints`: a
    deployment's entry that takes generations only has its edit lines refused."""
    models = {
        name: replace(m, endpoints=("generations",)) if m.name == "gpt-image-2" else m
        for name, m in config.prices.models.items()
    }
    narrowed = replace(config, prices=replace(config.prices, models=models))
    edit = line("e", url="/v1/images/edits", images=[{"file_id": "file_1"}])
    batch, _ = read(narrowed, edit + b"\n")
    assert not batch.ok
    assert batch.problems == [
        "line 1: Invalid value for 'model': 'gpt-image-2' does not support image edits. "
        "/v1/images/edits takes chatgpt-image-latest, dall-e-2, gpt-image-1, gpt-image-1-mini, "
        "gpt-image-1.5, gpt-image-2.5-flare, gpt-image-2.5-sunburst, gpt-image-2.6-flare, "
        "gpt-image-2.6-sunburst."
    ]
    assert read(config, edit + b"\n")[0].ok


def test_a_line_naming_an_end_user_id_past_its_length_is_refused(config: Config) -> None:
    # Its billed line would name counters the ledger cannot key: the batch, once billed by
    # OpenAI, could never be settled, and its reservation would be held for good.
    data = line("a", user="bob") + b"\n" + line("b", user="x" * 257) + b"\n"
    batch, _ = read(config, data)
    assert not batch.ok
    assert [p.split(":")[0] for p in batch.problems] == ["line 2"]
    assert "'user': string too long" in batch.report()


def test_the_teams_policy_refuses_lines_it_would_change(config: Config) -> None:
    batch, _ = read(
        config, line("hi", quality="high") + b"\n" + line("m", model="gpt-image-1"), "strict"
    )
    assert [p.split(":")[0] for p in batch.problems] == ["line 1", "line 2"]
    assert "quality high" in batch.problems[0]
    assert "may not use model" in batch.problems[1]


def test_edits_name_their_files_for_the_ownership_check(config: Config) -> None:
    edit = line(
        "e",
        url="/v1/images/edits",
        images=[{"file_id": "file_a"}, {"image_url": "https://example.com/x.png"}],
        mask={"file_id": "file_m"},
    )
    batch, _ = read(config, edit)
    assert batch.ok, batch.problems
    assert batch.lines[0].file_ids == ("file_a", "file_m")


def test_an_empty_file_and_one_over_the_line_limit_are_refused(config: Config) -> None:
    assert read(config, b"")[0].problems == [
        "the file holds no request: a batch needs at least one line"
    ]
    many = BatchFile(team_named(config), config)
    many._count = MAX_LINES  # as if 50,000 lines had been read
    many.feed(line("one-more") + b"\n")
    many.finish()
    assert any("at most 50,000" in p for p in many.problems)


def test_problems_are_listed_up_to_a_limit_then_counted(config: Config) -> None:
    batch, _ = read(config, b"\n".join(b"x" for _ in range(MAX_PROBLEMS + 7)))
    assert len(batch.problems) == MAX_PROBLEMS and batch.more_problems == 7
    assert batch.report().endswith("… and 7 more")


@settings(max_examples=60, deadline=None)
@given(step=st.integers(min_value=1, max_value=400), crlf=st.booleans(), last_newline=st.booleans())
def test_how_the_file_arrives_in_chunks_does_not_change_what_is_read(
    config: Config, step: int, crlf: bool, last_newline: bool
) -> None:
    sep = b"\r\n" if crlf else b"\n"
    data = sep.join(line(f"r{i}", size="1536x1024") for i in range(5))
    data += sep if last_newline else b""
    whole, whole_out = read(config, data)
    split, split_out = read(config, data, step=step)
    assert whole.ok and split.ok
    assert split_out == whole_out
    assert split.bound_nanos == whole.bound_nanos and len(split.lines) == 5


def test_a_long_line_arriving_in_many_chunks_is_read_in_linear_time(config: Config) -> None:
    """The file is read on the event loop: a 32 MiB line in 32 KiB chunks (a 200 MB file
    holds three 64 MiB lines) must not be copied and searched again at every chunk, which
    took seconds and stalled every other request meanwhile."""
    data = b"x" * (32 * 1024 * 1024)
    batch = BatchFile(team_named(config), config)
    started = time.monotonic()
    for at in range(0, len(data), 32 * 1024):
        assert batch.feed(data[at : at + 32 * 1024]) == b""
    assert time.monotonic() - started < 1.0
    batch.feed(b"\n" + line("after") + b"\n")
    batch.finish()
    assert batch.problems[0].startswith("line 1: We could not parse")
    assert [x.custom_id for x in batch.lines] == ["after"]


@pytest.mark.parametrize("step", [0, 7, 100])
def test_a_line_too_long_is_one_problem_and_the_lines_after_it_keep_their_numbers(
    config: Config, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    monkeypatch.setattr(batches, "MAX_LINE_BYTES", 1000)
    data = line("a") + b"\n" + b'{"x": "' + b"y" * 2500 + b'"}\n' + line("c") + b"\nbad\n"
    batch, _ = read(config, data, step=step)
    reasons = [p.split(":")[0] for p in batch.problems]
    assert reasons == ["line 2", "line 4"]
    assert batch.problems[0] == "line 2: longer than 1,000 bytes"
    assert [x.custom_id for x in batch.lines] == ["a", "c"]
    assert [x.line for x in batch.lines] == [1, 3]


def test_a_custom_id_longer_than_the_output_file_is_read_for_is_refused(config: Config) -> None:
    batch, _ = read(config, line("k" * MAX_CUSTOM_ID) + b"\n" + line("k" * (MAX_CUSTOM_ID + 1)))
    assert batch.problems == ["line 2: 'custom_id' is longer than 4,096 characters"]


# -- checked again when the batch is created ------------------------------------------------


def test_a_file_checked_again_under_the_same_configuration_keeps_its_bound(
    config: Config,
) -> None:
    batch, _ = read(config, line("a") + b"\n" + line("b", n=2, quality="high"))
    again = bound_now(
        team_named(config), config, batch.lines, Estimate(batch.usage, batch.bound_nanos)
    )
    assert again == Estimate(batch.usage, batch.bound_nanos)


def test_a_file_of_two_models_is_bounded_at_the_dearer_one(config: Config) -> None:
    batch, _ = read(config, line("a") + b"\n" + line("b", model="gpt-image-1-mini"))
    priced_at = Estimate(batch.usage, 1)  # as if priced at far lower rates
    again = bound_now(team_named(config), config, batch.lines, priced_at)
    dearest = max(
        config.prices.find(m).for_batch().cost(batch.usage)  # type: ignore[union-attr]
        for m in ("gpt-image-2", "gpt-image-1-mini")
    )
    assert again.cost_nanos == dearest >= batch.bound_nanos


def test_every_line_a_tightened_policy_refuses_is_listed(config: Config) -> None:
    batch, _ = read(config, line("a", quality="high") + b"\n" + line("b", model="gpt-image-1.5"))
    with pytest.raises(PolicyViolation) as refused:
        bound_now(team_named(config, "strict"), config, batch.lines, Estimate(batch.usage, 0))
    message = refused.value.message
    assert "line 1: quality high" in message and "line 2: Team strict may not use model" in message
    assert refused.value.status == 403 and refused.value.param == "input_file_id"


TIGHTENED = [
    (Allow(params={"output_format": frozenset({"png"})}), "line 2: Team design may not send "
     "output_format=webp"),
    (Allow(params={"moderation": frozenset({"low"})}), "line 1: Team design may not leave "
     "moderation out"),
    (Allow(sizes=frozenset({"1024x1024"})), "line 2: Team design may not request size "
     "1536x1024"),
    (Allow(max_n=1), "line 2: Team design may request at most 1 images"),
    (Allow(models=frozenset({"gpt-image-1.5"})), "line 1: Team design may not use model"),
]  # fmt: skip


@pytest.mark.parametrize(("allow", "reason"), TIGHTENED)
def test_a_file_uploaded_before_allow_tightened_is_checked_whole_when_its_batch_is_created(
    config: Config, allow: Allow, reason: str
) -> None:
    """Every `allow` rule in force at the create holds for every line, `allow.params` too
    (the line's fields as given, and OpenAI's default for one left out)."""
    batch, _ = read(
        config,
        line("a", size="1024x1024", output_format="png")
        + b"\n"
        + line("b", size="1536x1024", output_format="webp", n=2),
    )
    assert batch.ok
    team = replace(team_named(config), allow=allow)
    with pytest.raises(PolicyViolation) as refused:
        bound_now(team, config, batch.lines, Estimate(batch.usage, batch.bound_nanos))
    assert reason in refused.value.message, refused.value.message


def test_a_line_stored_before_its_fields_were_kept_is_checked_on_its_columns(
    config: Config,
) -> None:
    batch, _ = read(config, line("a", size="1024x1024", output_format="webp"))
    kept = [replace(x, policy=None) for x in batch.lines]
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    strict_params = replace(
        team_named(config), allow=Allow(params={"output_format": frozenset({"png"})})
    )
    assert bound_now(strict_params, config, kept, priced_at) == priced_at
    strict_sizes = replace(team_named(config), allow=Allow(sizes=frozenset({"1536x1024"})))
    with pytest.raises(PolicyViolation):
        bound_now(strict_sizes, config, kept, priced_at)


def test_a_line_no_longer_priced_is_refused_as_a_bad_request(config: Config) -> None:
    batch, _ = read(config, line("a", quality="high") + b"\n" + line("b"))
    gone = replace(batch.lines[1], model="gpt-image-0")
    with pytest.raises(InvalidRequest) as refused:
        bound_now(
            team_named(config, "strict"), config, [batch.lines[0], gone], Estimate(batch.usage, 0)
        )
    assert "line 1: quality high" in refused.value.message
    assert "line 2:" in refused.value.message


def test_each_user_gets_her_lines_part_of_the_bound_rounded_up_and_never_above_it() -> None:
    def stored(i: int, user: str | None, bound: int) -> BatchLine:
        return BatchLine(
            f"c{i}", i, "generations", "gpt-image-2", "low", "1024x1024", 1, user, bound
        )

    bound = Estimate(Usage(text_input=10, image_output=3000, images=3), 3_000_001)
    lines = [stored(1, "alice", 100), stored(2, "alice", 100), stored(3, "bob", 100)]
    shares = batches.user_shares(lines, bound)
    assert shares == {
        "alice": Estimate(Usage(text_input=7, image_output=2000, images=2), 2_000_001),
        "bob": Estimate(Usage(text_input=4, image_output=1000, images=1), 1_000_001),
    }
    # Her lines the whole file: the whole bound; lines naming no one: no share.
    assert batches.user_shares(lines[:2], bound) == {"alice": bound}
    assert batches.user_shares([stored(1, None, 100)], bound) == {}


def test_a_user_allow_params_names_is_checked_for_each_line_at_create(config: Config) -> None:
    """The lines' fields are kept once for all their users (`policy_text` writes the user
    field `null`), and each line's own user is checked where `allow.params` names it."""
    data = b"\n".join(line(f"l{i}", user=f"u{i}", size="1024x1024") for i in range(3))
    batch, _ = read(config, data)
    assert batch.ok and len({x.policy for x in batch.lines}) == 1
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    team = replace(team_named(config), allow=Allow(params={"user": frozenset({"u0", "u2"})}))
    with pytest.raises(PolicyViolation) as refused:
        bound_now(team, config, batch.lines, priced_at)
    assert refused.value.message.splitlines()[1:] == [
        "line 2: Team design may not send user=u1 (allow.params.user: u0, u2)."
    ]
    everyone = replace(team, allow=Allow(params={"user": frozenset({"u0", "u1", "u2"})}))
    assert bound_now(everyone, config, batch.lines, priced_at) == priced_at
