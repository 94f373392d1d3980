"""Generated Images API requests: the bound Tollgate reserves for the bytes it forwards
(as asked and after each downgrade) is never below what the simulated upstream bills for
those bytes, priced at the simulator's rates and at Tollgate's price book.

Requests range over everything the doors accept: every model and alias of the price book
(and none, for the default), every quality with `auto`, sizes with `auto` and custom sizes
at the limits of the rules, `n`, streams with partial images, output options; edits as
multipart (1-16 PNG/JPEG/WebP images of random sizes, mask, markup, input fidelity) and
as JSON (data URLs, URLs, file ids); dall-e-2 variations. A request either side refuses
proves nothing and is skipped; the property is over the ones both accept.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from PIL import Image

from proxy.core.image_tokens import CustomSizes, TileRule
from proxy.core.models import Endpoint
from proxy.core.multipart import Upload, encode_multipart
from proxy.core.settings import Config
from proxy.simulator.forms import parse_json
from proxy.simulator.tokens import image_input_tokens, tokens_for
from proxy.simulator.validation import validate
from tests.bound_oracle import (
    IMAGES,
    POLICIES,
    build_config,
    check_images,
    examples,
    images_bill,
    sent_forms,
    team_with,
)

MODELS = (
    "gpt-image-2.6-sunburst", "gpt-image-2.6-flare", "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08", "gpt-image-2.5-flare", "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-1.5", "chatgpt-image-latest",
    "gpt-image-1", "gpt-image-1-mini", "dall-e-3", "dall-e-2",
)  # fmt: skip
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd")
FIXED_SIZES = (
    "auto", "1024x1024", "1536x1024", "1024x1536", "256x256", "512x512", "1792x1024",
    "1024x1792", "1536x1536", "2048x2048", "3840x2160", "2160x3840", "3840x1280",
    "1280x3840", "1024x640", "816x816", "2880x2880",
)  # fmt: skip
# A failing example's data URLs make a long repr: worth it, it is the counterexample.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
# Custom sizes at the rules' corners: the fewest and most pixels, the widest aspects,
# the longest edge.
VALID_CUSTOM = (
    "auto", "1024x640", "640x1024", "816x816", "1536x864", "2048x1152", "2048x2048",
    "2880x2880", "3840x2160", "2160x3840", "3840x1280", "1280x3840", "3840x1296",
)  # fmt: skip
JSON = "application/json"
MAX_EDGE, MULTIPLE, MIN_PIXELS, MAX_PIXELS = 3840, 16, 655_360, 8_294_400


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return build_config(tmp_path_factory.mktemp("bound-images"))


@st.composite
def custom_sizes(draw: st.DrawFn) -> str:
    """A `WxH` near the custom-size rules' limits (some just past them)."""
    width = draw(st.integers(1, MAX_EDGE // MULTIPLE)) * MULTIPLE
    edge = draw(st.sampled_from(("free", "min_pixels", "max_pixels", "aspect", "max_edge")))
    if edge == "min_pixels":
        height = -(-MIN_PIXELS // width)
    elif edge == "max_pixels":
        height = MAX_PIXELS // width
    elif edge == "aspect":
        height = width * 3 if draw(st.booleans()) else width // 3
    elif edge == "max_edge":
        height = MAX_EDGE
    else:
        height = draw(st.integers(1, MAX_EDGE))
    height = max(MULTIPLE, height // MULTIPLE * MULTIPLE + draw(st.sampled_from((0, 0, MULTIPLE))))
    if draw(st.booleans()):
        width, height = height, width
    return f"{width}x{height}"


def sizes() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(FIXED_SIZES), custom_sizes())


LADDERS = {
    "gpt-image-2": ("low", "medium", "high"),
    "gpt-image-2.5": ("low", "medium", "high", "xhigh", "max"),
    "gpt-image-2.6": ("low", "medium", "high", "xhigh", "max"),
    "dall-e-3": ("standard", "hd"),
    "dall-e-2": ("standard",),
}
SIZES = {
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
}


def _family(model: str | None) -> str:
    name = model or "gpt-image-2"
    return next((f for f in (*LADDERS, *SIZES) if name.startswith(f)), name)


@st.composite
def quality_for(draw: st.DrawFn, model: str | None, strict: bool = False) -> str:
    """Mostly a quality the model takes (`auto` included), sometimes any (never, `strict`)."""
    ladder = st.sampled_from(("auto", *LADDERS.get(_family(model), ("low", "medium", "high"))))
    return draw(ladder if strict else ladder | st.sampled_from(QUALITIES))


@st.composite
def size_for(draw: st.DrawFn, model: str | None, strict: bool = False) -> str:
    """Mostly a size the model takes, sometimes any (never, `strict`)."""
    family = _family(model)
    if family in SIZES:
        taken = st.sampled_from(("auto", *SIZES[family]))
    elif family.startswith("gpt-image-2"):
        taken = st.sampled_from(VALID_CUSTOM) | custom_sizes()
        if strict:
            taken = st.sampled_from(VALID_CUSTOM)
    else:
        taken = st.sampled_from(("auto", "1024x1024", "1536x1024", "1024x1536"))
    return draw(taken if strict else taken | sizes())


prompts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"),
    min_size=1,
    max_size=300,
) | st.sampled_from(("a", "é" * 200, "🦊" * 100, "x" * 4000, "[[fault:texttokens]]", "cat"))


@st.composite
def options(draw: st.DrawFn, *, stream_allowed: bool = True) -> dict[str, Any]:
    """The parameters generations and edits share (each maybe omitted)."""
    body: dict[str, Any] = {}
    model = draw(st.sampled_from((None, *MODELS)))
    if model is not None:
        body["model"] = model
    picks = {
        "quality": quality_for(model),
        "size": size_for(model),
        "n": st.integers(1, 10),
        "output_format": st.sampled_from(("png", "jpeg", "webp")),
        "background": st.sampled_from(("transparent", "opaque", "auto")),
    }
    for name, strategy in picks.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    if body.get("output_format", "png") != "png" and draw(st.booleans()):
        body["output_compression"] = draw(st.integers(0, 100))
    if stream_allowed and draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["partial_images"] = draw(st.integers(0, 3))
    return body


def _check(config: Config, endpoint: Endpoint, content_type: str, body: bytes, fb: Any) -> None:
    accepted = check_images(endpoint, content_type, body, config, team_with(config, *fb))
    event(f"forms the simulator accepted: {min(accepted, 3)}{'+' if accepted > 3 else ''}")


@given(
    body=options(),
    prompt=prompts,
    moderation=st.sampled_from((None, "low", "auto")),
    policy=POLICIES,
)
@examples(150)
def test_a_generation_never_bills_above_its_bound(
    config: Config, body: dict[str, Any], prompt: str, moderation: str | None, policy: Any
) -> None:
    body = {**body, "prompt": prompt, **({"moderation": moderation} if moderation else {})}
    _check(config, "generations", "application/json", json.dumps(body).encode(), policy)


@pytest.fixture(scope="module")
def regional(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return build_config(tmp_path_factory.mktemp("bound-regional"), "https://eu.api.openai.com/v1")


@given(
    body=options(),
    prompt=prompts,
    moderation=st.sampled_from((None, "low", "auto")),
    policy=POLICIES,
)
@examples(100)
def test_a_generation_to_a_data_residency_endpoint_never_bills_above_its_bound(
    regional: Config, body: dict[str, Any], prompt: str, moderation: str | None, policy: Any
) -> None:
    assert regional.upstream.data_residency
    body = {**body, "prompt": prompt, **({"moderation": moderation} if moderation else {})}
    _check(regional, "generations", "application/json", json.dumps(body).encode(), policy)


# -- input images ----------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def picture(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    mode = "RGBA" if fmt == "PNG" else "RGB"
    Image.new(mode, (width, height), (90, 20, 200, 0)).save(out, fmt)
    return out.getvalue()


EXTENSIONS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
dimensions = st.one_of(
    st.integers(1, 64),
    st.integers(500, 530),
    st.integers(1000, 1100),
    st.sampled_from((512, 768, 1024, 1536, 2048, 2049, 2560)),
)


@st.composite
def pictures(draw: st.DrawFn) -> tuple[int, int, str]:
    fmt = draw(st.sampled_from(tuple(EXTENSIONS)))
    width, height = draw(dimensions), draw(dimensions)
    if fmt == "WEBP":  # slow to encode large
        width, height = min(width, 1100), min(height, 1100)
    return width, height, fmt


def upload(name: str, width: int, height: int, fmt: str) -> Upload:
    return Upload(name, picture(width, height, fmt), EXTENSIONS[fmt])


@given(
    body=options(),
    prompt=prompts,
    images=st.lists(pictures(), min_size=1, max_size=16),
    bracket=st.booleans(),
    mask=st.none() | pictures(),
    markup=st.none() | pictures(),
    fidelity=st.sampled_from((None, "low", "high")),
    policy=POLICIES,
)
@examples(25)
def test_a_multipart_edit_never_bills_above_its_bound(
    config: Config,
    body: dict[str, Any],
    prompt: str,
    images: list[tuple[int, int, str]],
    bracket: bool,
    mask: tuple[int, int, str] | None,
    markup: tuple[int, int, str] | None,
    fidelity: str | None,
    policy: Any,
) -> None:
    fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items()}
    fields["prompt"] = prompt
    if fidelity:
        fields["input_fidelity"] = fidelity
    name = "image[]" if bracket or len(images) > 1 else "image"
    uploads = [upload(name, *image) for image in images]
    if mask:
        uploads.append(upload("mask", mask[0], mask[1], "PNG"))
    if markup:
        uploads.append(upload("markup", markup[0], markup[1], "PNG"))
    data, content_type = encode_multipart(fields, tuple(uploads))
    _check(config, "edits", content_type, data, policy)


def data_url(width: int, height: int, fmt: str) -> str:
    encoded = base64.b64encode(picture(width, height, fmt)).decode()
    return f"data:image/{EXTENSIONS[fmt]};base64,{encoded}"


references = st.one_of(
    pictures().map(lambda p: {"image_url": data_url(*p)}),
    st.just({"image_url": "https://example.com/cat.png"}),
    st.just({"file_id": "file-abc123"}),
)


@given(
    body=options(),
    prompt=prompts,
    images=st.lists(references, min_size=1, max_size=16),
    mask=st.none() | references,
    fidelity=st.sampled_from((None, "low", "high")),
    moderation=st.sampled_from((None, "low", "auto")),
    policy=POLICIES,
)
@examples(40)
def test_a_json_edit_never_bills_above_its_bound(
    config: Config,
    body: dict[str, Any],
    prompt: str,
    images: list[dict[str, str]],
    mask: dict[str, str] | None,
    fidelity: str | None,
    moderation: str | None,
    policy: Any,
) -> None:
    body = {**body, "prompt": prompt, "images": images}
    body.update({k: v for k, v in (("mask", mask), ("input_fidelity", fidelity)) if v})
    if moderation:
        body["moderation"] = moderation
    _check(config, "edits", "application/json", json.dumps(body).encode(), policy)


@given(
    side=st.sampled_from((256, 512, 1024, 1000, 64)),
    size=st.sampled_from(("256x256", "512x512", "1024x1024", "auto", None)),
    n=st.integers(1, 10),
    endpoint=st.sampled_from(("variations", "edits")),
    model=st.sampled_from((None, "dall-e-2")),
)
@examples(20)
def test_a_dalle_2_variation_or_edit_never_bills_above_its_bound(
    config: Config, side: int, size: str | None, n: int, endpoint: Endpoint, model: str | None
) -> None:
    fields = {
        "n": str(n),
        **({"size": size} if size else {}),
        **({"model": model} if model else {}),
    }
    if endpoint == "edits":
        fields["prompt"] = "a cat"
    image = upload("image", side, side, "PNG")
    data, content_type = encode_multipart(fields, (image,))
    _check(config, endpoint, content_type, data, (None, None))


GPT_IMAGE_1_TILES = TileRule(2048, 512, 512, 65, 129, 4160, 6240)


@given(
    width=st.integers(1, 20_000) | st.integers(500, 2100),
    height=st.integers(1, 20_000) | st.integers(500, 2100),
    high=st.booleans(),
)
@examples(500)
def test_the_tile_rule_bound_covers_the_simulators_tile_count(
    width: int, height: int, high: bool
) -> None:
    """gpt-image-1's input rule, both sides pure: Tollgate's count (sides exact, tiles
    rounded up) is at least the simulator's (sides rounded) for every size."""
    ours = GPT_IMAGE_1_TILES.tokens(width, height, high)
    assert image_input_tokens(width, height, high_fidelity=high) <= ours
    assert ours <= GPT_IMAGE_1_TILES.ceiling


def test_the_fixture_config_is_the_built_in_price_book(config: Config, tmp_path: Path) -> None:
    assert config.prices.find("gpt-image-1") is not None
    assert all(CustomSizes().accepts(*map(int, s.split("x"))) for s in VALID_CUSTOM if s != "auto")
    tiles = config.prices.find("gpt-image-1").input_tiles  # type: ignore[union-attr]
    assert tiles == GPT_IMAGE_1_TILES


def test_the_simulator_bills_a_json_edits_data_url_image_at_its_size(config: Config) -> None:
    """As OpenAI reads the image it is sent: a 2048x512 data URL on gpt-image-1 at high
    fidelity is 4 tiles and the non-square extra (6,821 tokens), not a 1024x1024 stand-in
    (4,354); so the property above checks Tollgate's measure of data URLs too."""
    body = {
        "model": "gpt-image-1",
        "prompt": "a fox",
        "images": [{"image_url": data_url(2048, 512, "PNG")}],
        "input_fidelity": "high",
    }
    order = validate(parse_json("edits", json.dumps(body).encode()))
    assert tokens_for(order).image_input == 65 + 4 * 129 + 6240
    reference = {**body, "images": [{"file_id": "file-abc"}]}
    order = validate(parse_json("edits", json.dumps(reference).encode()))
    assert tokens_for(order).image_input == 65 + 129 + 4160


@given(
    body=options(),
    fallback=st.sampled_from(
        ("dall-e-3", "dall-e-2", "gpt-image-1", "gpt-image-2", "gpt-image-1-mini")
    ),
    edit=st.sampled_from((None, "low", "high")) | st.just(None),
)
@examples(100)
def test_a_downgrade_the_upstream_would_refuse_is_never_sent(
    config: Config, body: dict[str, Any], fallback: str, edit: str | None
) -> None:
    """Every form of a generation the simulator accepts as asked is accepted too: a
    fallback to DALL·E was sent with `n` above dall-e-3's 1, or streamed (1,500 generated
    requests had 859 such forms). A DALL·E request is left out: the simulator ignores the
    GPT-only options it carries (`background`, `output_format`), which a GPT fallback
    then checks."""
    assume(not str(body.get("model", "")).startswith("dall-e"))
    body = {**body, "prompt": "a fox"}
    endpoint: Endpoint = "generations"
    if edit is not None:  # a JSON edit with `input_fidelity`, which gpt-image-2 refuses
        endpoint = "edits"
        body |= {"images": [{"file_id": "file-abc"}], "input_fidelity": edit}
    data = json.dumps(body).encode()
    forms = sent_forms(IMAGES[endpoint], JSON, data, config, team_with(config, fallback))
    if not forms or images_bill(endpoint, forms[0], config.prices) is None:
        return
    for sent in forms[1:]:
        assert images_bill(endpoint, sent, config.prices) is not None, sent.changes


def test_a_request_with_input_fidelity_never_falls_back_to_gpt_image_2(config: Config) -> None:
    """gpt-image-2 refuses `input_fidelity` ("must be omitted"): such a fallback was sent
    and refused (the generated tests found it on 339 of 1,500 Responses bodies)."""
    body = {"model": "gpt-image-1.5", "prompt": "a fox", "input_fidelity": "high"}
    body |= {"images": [{"file_id": "file-abc"}], "quality": "high"}
    forms = sent_forms(
        IMAGES["edits"], JSON, json.dumps(body).encode(), config, team_with(config, "gpt-image-2")
    )
    assert forms and len(forms) > 1
    assert all(b'"gpt-image-2"' not in sent.body for sent in forms), [s.changes for s in forms]


def test_a_request_with_high_input_fidelity_never_falls_back_to_gpt_image_1_mini(
    config: Config,
) -> None:
    """gpt-image-1-mini takes `input_fidelity` `low` only ("Unsupported for
    gpt-image-1-mini"): an edit at `high` was sent to it, and refused; one at `low` may
    still fall back to it."""
    body = {"model": "gpt-image-1.5", "prompt": "a fox", "input_fidelity": "high"}
    body |= {"images": [{"file_id": "file-abc"}], "quality": "high"}
    team = team_with(config, "gpt-image-1-mini")
    forms = sent_forms(IMAGES["edits"], JSON, json.dumps(body).encode(), config, team)
    assert forms and len(forms) > 1
    assert all(b'"gpt-image-1-mini"' not in sent.body for sent in forms), [s.changes for s in forms]
    low = json.dumps({**body, "input_fidelity": "low"}).encode()
    forms = sent_forms(IMAGES["edits"], JSON, low, config, team)
    assert any(b'"gpt-image-1-mini"' in sent.body for sent in forms)
