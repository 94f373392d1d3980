"""The Responses API: `POST /v1/responses` with the `image_generation` tool (pure).

OpenAI bills a response twice over: its mainline model's tokens (`usage`, at that model's
text rates) and its image tool's (`tool_usage.image_gen`, at the image model's rates).
The bound reserved before it is sent covers both:

    mainline input   every text byte of the request (a token is at least one byte), the
                     tool's hidden instructions (`HIDDEN_INPUT_TOKENS`), each image in its
                     context at `MAINLINE_IMAGE_TOKENS` (`OWN_IMAGE_TOKENS` for a model
                     that bills images dearer), and the tokens of the response
                     it continues (`previous_response_id`), which OpenAI bills again;
                     read again at each of its `max_tool_calls` + 1 samplings, with what
                     it wrote and the images the calls made so far (`mainline_bound`)
    mainline output  `max_output_tokens` (reasoning included)
    images           `max_tool_calls` calls of the tool, each billed as one image of its
                     model, quality and size (with its partial images when streamed), its
                     text input (at most the request's text and the prompt the mainline
                     model writes, itself output), every image in the context and the
                     images the calls before it made (call k may edit those k images)

A request that leaves `max_output_tokens` or `max_tool_calls` open is closed by the
team's `responses:` policy (the cap written into it, or a 400). Only what Tollgate can
bound is forwarded: the function tool (its calls are the client's, each ending the
response: none made by a program OpenAI runs, none `async`, none loaded by tool search)
and the image tool, message, function-call (with their outputs), reasoning (with its
`encrypted_content`) and image-call (with its `result`) input items, text and image
content; anything else (file inputs, item references, reasoning or image calls named by
their id alone, other hosted tools, also as a `tool_choice`, `conversation`, reusable
prompts, reasoning beyond one standard run) is refused with a 400 that says so. The body
sent upstream is re-encoded from this parse, its input items without their ids
(`as_forwarded`: the upstream would read what it stored under them, whichever team's),
each with only the fields OpenAI documents for its type.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.core.asked import field, label
from proxy.core.budgets import Variant, apply_allow, priced
from proxy.core.errors import InvalidRequest, PolicyViolation, UnpricedModel
from proxy.core.image_params import (
    MAX_INTEGER,
    TOOL_CHOICES,
    USER_PARAMS,
    check_output_format,
    check_user,
)
from proxy.core.models import Asked, Endpoint, Estimate, ImageRequest, InputImage, Usage
from proxy.core.parsing import json_object
from proxy.core.pricing import MAX_N, REASONING_CONTEXTS, MainlinePrices
from proxy.core.settings import Config, Limits, Team
from proxy.core.settlement import Bound
from proxy.doors.images import priced as image_prices
from proxy.doors.response_input import as_forwarded, named_files, read_input
from proxy.doors.response_meters import ResponseAnswer, ResponseEvents

HIDDEN_INPUT_TOKENS = 4096
"""Input OpenAI adds to the mainline model for the image tool's own instructions: 1,820
input tokens were measured for a short prompt (gpt-5.5 with gpt-image-2), so twice that."""
MAINLINE_IMAGE_TOKENS = 12_800
"""The most one input image can cost the mainline model. The largest published vision
count is a 10-megapixel image at `detail: original`: 10,000 patches of 32 px. Patch models
bill each patch at a multiplier of their own, 1.2 for gpt-5.2 to gpt-5.5 as measured
(2,500 patches read as 3,008 input tokens: 3,000 and a few tokens of framing per image),
so 12,000 and that framing; 800 more leave room for both. The older patch models with
larger multipliers (gpt-4.1-nano 2.46, gpt-5-nano 1.5) are capped at 1,536 patches
(3,779 tokens at most)."""
OWN_IMAGE_TOKENS: Mapping[str, int] = {"gpt-4o-mini": 2833 + 8 * 5667}
"""Mainline models whose one input image can cost more: gpt-4o-mini bills an image as
gpt-4o does in dollars, 2,833 tokens plus 5,667 a 512-px tile, and a high-detail image
has up to 8 tiles (2048 x 768 once scaled)."""
MAX_TOOL_CALLS = MAX_N

BODY_PARAMS = frozenset(
    {
        "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens",
        "max_tool_calls", "stream", "stream_options", "background", "previous_response_id",
        "store", "metadata", "temperature", "top_p", "parallel_tool_calls", "user", "text",
        "reasoning", "truncation", "include", "service_tier", "prompt_cache_key",
        "prompt_cache_retention", "safety_identifier", "top_logprobs",
    }
)  # fmt: skip
"""The body parameters of `client.responses.create` that Tollgate can bound."""
REFUSED_PARAMS = {
    "conversation": "Conversations keep their items on OpenAI's side, where Tollgate cannot "
    "bound them: send `input` (and `previous_response_id`) instead.",
    "prompt": "Reusable prompts are stored on OpenAI's side, where Tollgate cannot bound "
    "them: send the prompt's text as `input`.",
}
UNBOUNDED_PARAMS = frozenset(
    {
        "access_programs", "background_options", "context_management", "image",
        "moderation", "prompt_cache_options",
    }
)  # fmt: skip
"""Body parameters of `client.responses.create` whose cost (compaction, a moderation model,
discounted windows, cache writes, access programs, image context compression) Tollgate has
no rule for: refused as not forwarded, not as unknown."""
TOOL_PARAMS = frozenset(
    {
        "type", "model", "quality", "size", "partial_images", "input_fidelity",
        "output_format", "output_compression", "background", "moderation", "action",
        "input_image_mask",
    }
)  # fmt: skip
FUNCTION_PARAMS = frozenset(
    {"type", "name", "description", "parameters", "strict", "output_schema"}
)
"""The fields of a function tool that are text the model reads (within the bound's bytes)."""
FUNCTION_PLAIN: Mapping[str, object] = {
    "allowed_callers": ["direct"],
    "async": False,
    "defer_loading": False,
}
"""Function-tool fields forwarded at these values only (their defaults): a function called
by a program OpenAI runs (`programmatic`), one whose call does not end the response
(`async`: the model samples on, reading its context again), or one loaded by tool search
runs the response in ways the bound does not count."""
SERVICE_TIERS = ("auto", "default", "flex")
"""Tiers priced at or below the price book's (Standard) rates; `priority` costs more.
`auto`, and an unset tier (which OpenAI reads as `auto`), is sent as `default`: `auto`
runs at the tier set in the OpenAI project's settings, which may be priority."""

_ENCODER = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ResponseBody:
    """A Responses request as understood: its fields (bounds written in) and its price."""

    fields: dict[str, Any]
    request: ImageRequest
    """The image tool as priced: up to `n` calls (0 without the tool), each given the
    context's images; `mainline` is the mainline model."""
    tool: int | None
    """The index of the image_generation tool in `tools`."""
    names_model: bool
    text_bytes: int
    """The request's text: every byte of its JSON but image data."""
    images: int
    """Images in the request's own input (and the tool's mask)."""
    max_output_tokens: int
    mainline: MainlinePrices | None
    """The mainline model's price-book entry (None: it has none, and is refused)."""
    injected: tuple[str, ...] = ()
    context_tokens: int = 0
    """The tokens of the response it continues, billed again as input."""
    files: tuple[str, ...] = ()
    """The files its input images and the tool's mask name by id."""


@dataclass(frozen=True, slots=True)
class ResponsesDoor:
    """`POST /v1/responses`."""

    @property
    def endpoint(self) -> Endpoint:
        return "responses"

    @property
    def upstream_path(self) -> str:
        return "/responses"

    def body_limit(self, limits: Limits) -> int:
        return limits.edits_bytes  # input images may be sent inline, as for edits

    def parse(self, content_type: str, body: bytes, config: Config, team: Team) -> ResponseBody:
        parsed = read_body(json_body(content_type, body), len(body), config.default_model, team)
        mainline = config.prices.find_mainline(parsed.request.mainline or "")
        _continued_context(parsed.fields, parsed.request.mainline or "", mainline)
        return replace(parsed, mainline=mainline)

    def request(self, parsed: ResponseBody) -> ImageRequest:
        return parsed.request

    def asked(self, content_type: str, body: bytes, config: Config) -> Asked:
        try:
            fields = json_body(content_type, body)
        except InvalidRequest:
            return Asked()
        return responses_asked(fields, config.default_model)

    def names_model(self, parsed: ResponseBody) -> bool:
        return parsed.names_model

    def file_ids(self, parsed: ResponseBody) -> tuple[str, ...]:
        return parsed.files

    def previous(self, parsed: ResponseBody) -> str | None:
        previous = parsed.fields.get("previous_response_id")
        return previous if isinstance(previous, str) else None

    def carry(self, parsed: ResponseBody, tokens: int, images: int) -> ResponseBody:
        own = parsed.request.images
        context = (*own, *(InputImage() for _ in range(images)))
        request = replace(parsed.request, images=context)
        return replace(parsed, request=request, context_tokens=tokens)

    def digest(self, parsed: ResponseBody) -> bytes:
        return hashlib.sha256(json.dumps(parsed.fields, sort_keys=True).encode()).digest()

    def injected(self, parsed: ResponseBody) -> str:
        return "; ".join(parsed.injected)

    def admit(
        self, team: Team, parsed: ResponseBody, config: Config, *, batch: bool = False
    ) -> Variant:
        """`batch`: priced at the Batch API's rates (a line of a batch file), the mainline
        and the image tool's model refused where the price book gives none."""
        request = parsed.request
        mainline = parsed.mainline
        if mainline is None:
            raise UnpricedModel(
                f"Model {request.mainline!r} is not in Tollgate's price book as a Responses "
                "API model, so its cost cannot be metered. Ask your Tollgate administrator "
                "to add it.",
                param="model",
            )
        allowed = team.allow.models
        if allowed is not None and not {request.mainline, mainline.name} & allowed:
            raise PolicyViolation(
                f"Team {team.name} may not use model {request.mainline!r} (allow.models: "
                f"{', '.join(sorted(allowed))}).",
                param="model",
            )
        if team.allow.max_n is not None and request.n > team.allow.max_n:
            raise PolicyViolation(
                f"Team {team.name} may have at most {team.allow.max_n} images made per "
                f"request (allow.max_n), not max_tool_calls={request.n}.",
                param="max_tool_calls",
            )
        if batch:
            if not mainline.accepts_batch:
                raise UnpricedModel(
                    f"Model {request.mainline!r} is not accepted by the Batch API (Tollgate's "
                    "price book gives it no batch rates).",
                    param="model",
                )
            mainline = mainline.for_batch()
        base = mainline_bound(parsed, mainline)
        param = f"tools[{parsed.tool}].model"
        try:
            model = image_prices(config.prices, request.model)
        except UnpricedModel as exc:
            raise UnpricedModel(exc.message, param=param) from None
        if batch and (model.accepts_batch or parsed.tool is not None):
            if not model.accepts_batch:
                raise UnpricedModel(
                    f"Model {model.name!r} is not accepted by the Batch API.", param=param
                )
            model = model.for_batch()
        if parsed.tool is None:
            # No image tool: the mainline model alone (the image part bounds nothing).
            return Variant(request, model, priced(model, request, base), (), base)
        try:
            model.validate(replace(request, n=1))
            return apply_allow(team, request, model, base)
        except (InvalidRequest, PolicyViolation) as exc:
            exc.param = tool_param(parsed.tool, exc.param)
            raise

    def bound(self, parsed: ResponseBody, variant: Variant) -> Bound:
        return Bound.of(variant, parsed.mainline)

    def encode(self, parsed: ResponseBody, variant: Variant) -> tuple[bytes, str]:
        fields = parsed.fields
        if parsed.tool is not None:
            sent = variant.request
            tools = list(fields["tools"])
            tool = dict(tools[parsed.tool])
            tool["model"] = sent.model
            for change in variant.changes:
                tool[change.knob] = getattr(sent, change.knob)
            tools[parsed.tool] = tool
            fields = {**fields, "tools": tools}
        return _ENCODER.encode(fields).encode(), "application/json"

    def answer_meter(self) -> ResponseAnswer:
        return ResponseAnswer()

    def stream_meter(self) -> ResponseEvents:
        return ResponseEvents()


def mainline_bound(parsed: ResponseBody, mainline: MainlinePrices) -> Estimate:
    """The most the mainline model can bill for `parsed`.

    With up to c image calls, the mainline model may sample c + 1 times: once before each
    call and once after the last, to answer. OpenAI's usage sums its samplings, and each
    reads the whole context again: the request (its text, the tool's instructions, its
    images, the response it continues), what the samplings before it wrote (never more
    than `max_output_tokens` in all) and the images the calls before it made (sampling k
    sees k of them). A model that bills its prompt-cache writes (`cache_write_input`) may
    write all of that context, each token at its write rate."""
    calls = parsed.request.n if parsed.tool is not None else 0
    per_image = OWN_IMAGE_TOKENS.get(mainline.name, MAINLINE_IMAGE_TOKENS)
    context = (
        parsed.text_bytes
        + HIDDEN_INPUT_TOKENS
        + len(parsed.request.images) * per_image
        + parsed.context_tokens
    )
    made = calls * (calls + 1) // 2
    read = (calls + 1) * context + calls * parsed.max_output_tokens + made * per_image
    # Every token read may be written to the prompt cache (from gpt-5.6 on, OpenAI writes
    # one implicit breakpoint by default), at the entry's `cache_write_input` rate.
    usage = Usage(
        mainline_input=read, mainline_output=parsed.max_output_tokens, mainline_cache_write=read
    )
    return Estimate(usage, mainline.cost(usage))


# -- reading the body ----------------------------------------------------------------


def json_body(content_type: str, body: bytes) -> dict[str, Any]:
    """The body, which must be a JSON object (`json_object`) sent as `application/json`."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise InvalidRequest(
            f"Unsupported content type {content_type or '(none)'!r} for /v1/responses: "
            "send application/json."
        )
    return json_object(body)


def responses_asked(fields: Mapping[str, Any], default_model: str) -> Asked:
    """What a Responses request refused before it was understood asked (`proxy.core.asked`):
    its mainline model, and its first image_generation tool's model, quality and size
    (none when it has no such tool, or `tool_choice: none` keeps it from being called,
    as `makes_images` records a request that makes no image)."""
    mainline = label(fields.get("model")) or None  # none is required: empty names none
    tools = fields.get("tools")
    tool = next(
        (
            t
            for t in (tools if isinstance(tools, list) else ())
            if isinstance(t, dict) and t.get("type") == "image_generation"
        ),
        None,
    )
    if tool is None or fields.get("tool_choice") == "none":
        return Asked(mainline=mainline)
    return Asked(
        model=field(tool, "model", default_model),
        quality=field(tool, "quality", "auto"),
        size=field(tool, "size", "auto"),
        mainline=mainline,
    )


def read_body(fields: dict[str, Any], size: int, default_model: str, team: Team) -> ResponseBody:
    """The request `fields` (a JSON object of `size` bytes) understood and bounded."""
    for name in fields:
        if name in REFUSED_PARAMS:
            raise InvalidRequest(
                f"Tollgate does not support '{name}' yet. {REFUSED_PARAMS[name]}", param=name
            )
        if name in UNBOUNDED_PARAMS:
            raise InvalidRequest(
                f"Tollgate does not forward '{name}' yet: it forwards only the Responses API "
                "parameters whose cost it can bound.",
                param=name,
            )
        if name not in BODY_PARAMS:
            raise InvalidRequest(
                f"Unknown parameter: '{name}'. Tollgate forwards only the Responses API "
                "parameters it can price.",
                param=name,
            )
    fields = {k: v for k, v in fields.items() if v is not None}
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    stream = _flag(fields, "stream")
    _flag(fields, "background")
    tier = fields.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise InvalidRequest(
            f"Tollgate does not forward service_tier={tier!r}: its rates are not in the price "
            f"book. Use one of {', '.join(SERVICE_TIERS)}.",
            param="service_tier",
        )
    _reasoning(fields)
    image_data, input_images = read_input(fields.get("input"))
    if "input" in fields:
        fields["input"] = as_forwarded(fields["input"])
    for name in ("instructions", "previous_response_id"):
        # A previous response named by anything but its id would be forwarded unbounded.
        if name in fields and not isinstance(fields[name], str):
            raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name)
    tools = fields.get("tools", [])
    index, tool = _tools(tools)
    choice = _tool_choice(fields.get("tool_choice", "auto"))
    policy = team.responses
    injected: list[str] = []

    def bounded(name: str, default: int, low: int, high: int | None) -> int:
        value = fields.get(name)
        if value is None:
            if policy.unbounded == "refuse":
                raise InvalidRequest(
                    f"Set '{name}': without it this request's cost has no bound, and your "
                    "team's policy (responses.unbounded: refuse) asks for one.",
                    param=name,
                )
            fields[name] = default
            injected.append(f"{name}=unset->{default}")
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name)
        if value < low or (high is not None and value > high):
            top = f" and at most {high}" if high is not None else ""
            raise InvalidRequest(
                f"Invalid '{name}': expected at least {low}{top}, got {value}.", param=name
            )
        return value

    max_output = bounded("max_output_tokens", policy.max_output_tokens, 16, MAX_INTEGER)
    calls = 0
    if tool is not None and choice != "none":
        calls = bounded("max_tool_calls", policy.max_tool_calls, 1, MAX_TOOL_CALLS)
    if tier is None or tier == "auto":
        # Sent as `default`, the tier priced. An unset tier changes nothing for a project
        # with no tier of its own (OpenAI runs it at `default`), so it is not named; an
        # `auto` the client asked for is.
        fields["service_tier"] = "default"
        if tier == "auto":
            injected.append("service_tier=auto->default")
    names_model = tool is None or (isinstance(tool.get("model"), str) and bool(tool["model"]))
    image_model = tool["model"] if tool is not None and names_model else default_model
    if not names_model:
        # Written into the forwarded tool (OpenAI's own default is a retired model), and so
        # named, as every value Tollgate writes in is (SPEC 11.1).
        injected.append(f"tools[{index}].model=unset->{default_model}")
    mask = 1 if tool is not None and tool.get("input_image_mask") is not None else 0
    text_bytes = size - image_data
    request = ImageRequest(
        endpoint="responses",
        model=image_model,
        # Each call's prompt: at most the request's text and what the mainline model writes.
        prompt_bytes=text_bytes + max_output,
        n=calls,
        quality=_text(tool, "quality", "auto"),
        size=_text(tool, "size", "auto"),
        stream=stream,
        partial_images=_partial_images(tool) if stream else 0,
        input_fidelity=tool.get("input_fidelity") if tool is not None else None,
        images=tuple(InputImage() for _ in range(input_images + mask)),
        user=_user(fields),
        params=_policy_params(fields, tool),
        mainline=model,
    )
    return ResponseBody(
        fields,
        request,
        index,
        names_model,
        text_bytes,
        input_images + mask,
        max_output,
        None,
        tuple(injected),
        files=named_files(fields.get("input"), tool),
    )


COUNT_PARAMS = frozenset(
    {
        "model", "input", "instructions", "tools", "tool_choice", "previous_response_id",
        "reasoning", "text", "truncation", "parallel_tool_calls",
    }
)  # fmt: skip
"""The body parameters of `client.responses.input_tokens.count` Tollgate forwards."""


@dataclass(frozen=True, slots=True)
class CountBody:
    """A `POST /v1/responses/input_tokens` body as understood: free, but it may name
    objects (the response it continues, files) that must be the team's own."""

    fields: dict[str, Any]
    previous: str | None
    files: tuple[str, ...]

    def encode(self) -> bytes:
        return _ENCODER.encode(self.fields).encode()


def read_count(fields: dict[str, Any]) -> CountBody:
    """The body of an input-token count, read with the rules of `read_body` for what it
    may hold (the same inputs and tools: what a response could not be sent with, it is
    not counted for), and the objects it names."""
    for name in fields:
        if name in REFUSED_PARAMS:
            raise InvalidRequest(
                f"Tollgate does not support '{name}' yet. {REFUSED_PARAMS[name]}", param=name
            )
        if name not in COUNT_PARAMS:
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name)
    fields = {k: v for k, v in fields.items() if v is not None}
    read_input(fields.get("input"))
    if "input" in fields:
        fields["input"] = as_forwarded(fields["input"])
    for name in ("model", "instructions", "previous_response_id"):
        if name in fields and not isinstance(fields[name], str):
            raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name)
    _, tool = _tools(fields.get("tools", []))
    if "tool_choice" in fields:
        _tool_choice(fields["tool_choice"])
    return CountBody(
        fields, fields.get("previous_response_id"), named_files(fields.get("input"), tool)
    )


def _user(fields: Mapping[str, Any]) -> str | None:
    """Who per-user budgets count the request against: `safety_identifier`, else `user`."""
    found = None
    for name in USER_PARAMS:
        value = fields.get(name)
        if isinstance(value, str) and value:
            check_user(value, name)
            found = found or value
    return found


def _reasoning(fields: Mapping[str, Any]) -> None:
    """The reasoning options the bound covers: reasoning is output, within
    `max_output_tokens` (what earlier turns reasoned is `_continued_context`'s)."""
    reasoning = fields.get("reasoning")
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise InvalidRequest("Invalid type for 'reasoning': expected an object.", param="reasoning")
    mode = reasoning.get("mode")
    if mode is not None and mode != "standard":
        raise InvalidRequest(
            f"Tollgate does not forward reasoning.mode={mode!r}: it bills the aggregated work "
            "of the mode's runs, which Tollgate's bound (one run: its input once, its output "
            "within max_output_tokens) does not cover. Leave reasoning.mode out, or set it "
            "to 'standard'.",
            param="reasoning.mode",
        )


def _continued_context(
    fields: Mapping[str, Any], name: str, mainline: MainlinePrices | None
) -> None:
    """Refuse a continued response whose mainline model reasons over all turns: the
    response continued dropped the reasoning of the turns before its own from its context,
    so its tokens (the context carried into the bound) do not hold it, and `all_turns`
    renders it all again, billed as input. The context is the request's `current_turn` or
    `all_turns`, else (left out, or `auto`) the model's own: the price book's
    `reasoning_context` (the gpt-5.6 family defaults to `all_turns`)."""
    if "previous_response_id" not in fields:
        return
    asked = fields.get("reasoning", {}).get("context")
    what = f"reasoning.context={asked!r}"
    if asked in REASONING_CONTEXTS:
        context = asked
    else:
        context = mainline.reasoning_context if mainline is not None else "current_turn"
        given = "reasoning.context left out" if asked is None else what
        what = f"{given} (model {name!r} then reasons over all turns)"
    if context == "all_turns":
        raise InvalidRequest(
            f"Tollgate does not forward {what} with previous_response_id: it renders the "
            "reasoning of every earlier turn again as input, which the response continued "
            "does not hold, so Tollgate cannot bound it. Use 'current_turn', or send the "
            "turns' reasoning items (with their encrypted_content) in 'input'.",
            param="reasoning.context",
        )


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"Invalid type for '{name}': expected a boolean.", param=name)
    return value


TOOL_POLICY_PARAMS = frozenset({*TOOL_CHOICES, "output_compression", "partial_images", "size"})
"""The image tool's fields a team's `allow` reads (its `size` for `allow.sizes`)."""
TOP_POLICY_PARAMS = frozenset({"stream", *USER_PARAMS})
"""The request's own fields `allow.params` reads (the tool has none of these)."""


def _policy_params(
    fields: Mapping[str, Any], tool: Mapping[str, Any] | None
) -> tuple[tuple[str, str], ...]:
    """The fields `allow` checks, as text: the image tool's, and the request's stream and
    end-user ids (a field left out is absent: `allow.params` then reads OpenAI's default)."""
    if tool is None:
        return ()
    found = [(k, v) for k, v in tool.items() if k in TOOL_POLICY_PARAMS]
    found += [(k, v) for k, v in fields.items() if k in TOP_POLICY_PARAMS]
    return tuple(
        (k, str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in found
        if isinstance(v, str | bool | int)
    )


def _text(tool: Mapping[str, Any] | None, name: str, default: str) -> str:
    value = (tool or {}).get(name, default)
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for 'tools[].{name}': expected a string.", param=name)
    return value


def _partial_images(tool: Mapping[str, Any] | None) -> int:
    value = (tool or {}).get("partial_images", 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3:
        raise InvalidRequest(
            "Invalid value for 'tools[].partial_images': expected an integer from 0 to 3.",
            param="partial_images",
        )
    return value


def _tools(tools: Any) -> tuple[int | None, dict[str, Any] | None]:
    """The image_generation tool (its index) among `tools`: function tools are allowed
    (their calls are the client's to make), hosted tools Tollgate does not price are not."""
    if not isinstance(tools, list):
        raise InvalidRequest("Invalid type for 'tools': expected an array.", param="tools")
    found: tuple[int | None, dict[str, Any] | None] = (None, None)
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            _function(tool, index)
            continue
        if kind != "image_generation":
            raise InvalidRequest(
                f"Tollgate does not meter the {kind!r} tool: it forwards the image_generation "
                "and function tools only.",
                param=f"tools[{index}].type",
            )
        if found[0] is not None:
            raise InvalidRequest(
                "The image_generation tool may be given once.", param=f"tools[{index}]"
            )
        for name in tool:
            if name not in TOOL_PARAMS:
                raise InvalidRequest(
                    f"Unknown parameter: 'tools[{index}].{name}'. Tollgate cannot price it.",
                    param=f"tools[{index}].{name}",
                )
        check_output_format(tool.get("output_format"), f"tools[{index}].output_format")
        for name, choices in TOOL_CHOICES.items():
            value = tool.get(name)
            if value is not None and value not in choices:
                raise InvalidRequest(
                    f"Invalid value for 'tools[{index}].{name}': {value!r}. Supported values "
                    f"are: {', '.join(choices)}.",
                    param=f"tools[{index}].{name}",
                )
        found = (index, tool)
    return found


TOOL_CHOICE_MODES = ("none", "auto", "required")
CHOSEN_TOOLS: Mapping[str, frozenset[str]] = {
    "function": frozenset({"type", "name"}),
    "image_generation": frozenset({"type"}),
}
"""The tools a `tool_choice` may name, each with the fields it is named by: the two tools
Tollgate forwards (`_tools`)."""


def _tool_choice(choice: Any) -> Any:
    """`choice`, the request's `tool_choice`, when it names only tools Tollgate forwards:
    a mode, the image tool, a function by its name, or `allowed_tools` of those. A choice
    naming another tool (a hosted one, `programmatic_tool_calling`, `shell`, an MCP
    server), or a tool with fields beyond its name (`allowed_tools` holds "tool
    definitions"), is refused: a field Tollgate has no rule for may be one OpenAI bills
    for."""
    if isinstance(choice, str) and choice in TOOL_CHOICE_MODES:
        return choice
    if not isinstance(choice, dict):
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': expected one of {', '.join(TOOL_CHOICE_MODES)} "
            "or an object.",
            param="tool_choice",
        )
    if choice.get("type") != "allowed_tools":
        _chosen_tool(choice, "tool_choice")
        return choice
    for name in choice:
        if name not in ("type", "mode", "tools"):
            raise InvalidRequest(
                f"Unknown parameter: 'tool_choice.{name}'. Tollgate cannot price it.",
                param=f"tool_choice.{name}",
            )
    if choice.get("mode") not in ("auto", "required"):
        raise InvalidRequest(
            "Invalid value for 'tool_choice.mode': expected auto or required.",
            param="tool_choice.mode",
        )
    allowed = choice.get("tools")
    if not isinstance(allowed, list):
        raise InvalidRequest(
            "Invalid type for 'tool_choice.tools': expected an array.", param="tool_choice.tools"
        )
    for index, named in enumerate(allowed):
        _chosen_tool(named, f"tool_choice.tools[{index}]")
    return choice


def _chosen_tool(named: Any, where: str) -> None:
    """Refuse a tool named by `tool_choice` (at `where`) that is not one Tollgate forwards,
    or that carries fields beyond those it is named by."""
    kind = named.get("type") if isinstance(named, dict) else None
    fields = CHOSEN_TOOLS.get(kind) if isinstance(kind, str) else None
    if isinstance(named, dict) and kind is None:
        raise InvalidRequest(f"Missing required parameter: '{where}.type'.", param=f"{where}.type")
    if fields is None or not isinstance(named, dict):
        raise InvalidRequest(
            f"Tollgate does not forward a tool_choice naming the {kind!r} tool: it forwards "
            "the image_generation and function tools only.",
            param=f"{where}.type",
        )
    for name in named:
        if name not in fields:
            raise InvalidRequest(
                f"Tollgate does not forward '{where}.{name}': a tool is named in tool_choice "
                f"by its {' and '.join(sorted(fields))} alone, and a field Tollgate has no "
                "rule for may be one OpenAI bills for. Leave it out.",
                param=f"{where}.{name}",
            )
    if kind == "function" and not isinstance(named.get("name"), str):
        raise InvalidRequest(f"Missing required parameter: '{where}.name'.", param=f"{where}.name")


def _function(tool: Mapping[str, Any], index: int) -> None:
    """Refuse a function tool with a field the bound does not cover (`FUNCTION_PLAIN`) or
    does not know: its calls must be the client's, each ending the response."""
    for name, value in tool.items():
        if name in FUNCTION_PARAMS or value is None:
            continue
        param = f"tools[{index}].{name}"
        if name not in FUNCTION_PLAIN:
            raise InvalidRequest(
                f"Unknown parameter: '{param}'. Tollgate cannot price it.", param=param
            )
        plain = FUNCTION_PLAIN[name]
        if type(value) is not type(plain) or value != plain:
            raise InvalidRequest(
                f"Tollgate does not forward a function tool with {name}="
                f"{json.dumps(value)}: its calls would not be the client's, each ending the "
                f"response, so Tollgate cannot bound what the response costs. Leave "
                f"'{name}' out, or set it to {json.dumps(plain)}.",
                param=param,
            )


def tool_param(index: int, param: str | None) -> str | None:
    """The `param` of an error about the image tool's request, as OpenAI names it: the
    tool's own field (`tools[0].quality`), or `max_tool_calls` for its image count (the
    `n` of the Images API). It used to be the Images API's name (`quality`), a field of
    no Responses request."""
    if param is None:
        return None
    if param == "n":
        return "max_tool_calls"
    if param in TOP_POLICY_PARAMS:
        return param
    return f"tools[{index}].{param}"
