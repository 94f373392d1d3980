"""The token rules of a simulated Responses answer (pure).

Mainline tokens (top-level `usage`):
    input   ceil(utf-8 bytes / 4) of the instructions and every input text (function
            calls' names and arguments, their outputs' text), the tile rule for each input
            image (a message's, a function output's, an image call's result fed back;
            counted at 1024x1024; gpt-4o-mini has its own, dearer rule), the reasoning
            tokens of reasoning items fed back (their `encrypted_content`), plus the
            previous response's
            input and output tokens, which OpenAI bills again as input; of those carried
            tokens, `cached_tokens` reports the part prompt caching would hit (128-token
            steps, from 1024 tokens on); a model that bills prompt-cache writes
            (gpt-5.6-sol) writes every uncached token (`cache_write_tokens`). With k
            image calls the model samples k + 1 times (before each call and once to
            answer), and the usage sums them: each sampling after the first reads
            that context again, with what the samplings before it wrote (each call's
            prompt, the reasoning) and the images the calls before it made, at the
            image rule (the dearer reading of OpenAI's silence)
    output  the answer text's tokens (a function call's name and arguments instead, when
            the model calls one), the revised prompt's tokens per image call (the
            model writes the call), and REASONING_TOKENS for reasoning models
            (`output_tokens_details.reasoning_tokens`)
Image tokens (`tool_usage.image_gen`), summed over calls, by the Images path's rules
(`tokens.py`) for the tool's model, quality and size: the revised prompt as text input,
the input images as image input, and 100 output tokens per partial image when streamed.
A call is given every image in the context, the images the calls before it in the same
response made included (a chain of edits: the second call edits the first one's image),
each counted at its own size, as a later response is given them through
`previous_response_id`.

With `max_output_tokens` below the output the answer needs, the response is
`incomplete` (reason `max_output_tokens`): the image calls still run and bill, the text
is cut, and `output_tokens` is `max_output_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.responses import ResponseOrder
from proxy.simulator.tokens import image_input_tokens, text_tokens, tokens_for

REASONING_TOKENS = 64
CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128
MAINLINE_IMAGE_TOKENS = image_input_tokens(1024, 1024, high_fidelity=False)


@dataclass(frozen=True)
class ResponseTokens:
    """What one response bills: the mainline model's tokens and the image tool's."""

    mainline: MainlineUsage
    image_gen: BilledUsage
    answer: str
    """The answer text, cut when `max_output_tokens` is reached."""
    incomplete: bool
    first_input: int | None = None
    """The first sampling's input (what a response cancelled before it ended had read);
    None: all of `mainline.input`."""


def answer_text(calls: int) -> str:
    """The mainline model's deterministic answer."""
    if calls == 0:
        return "This is the simulator's answer to your request."
    if calls == 1:
        return "Here is the image you asked for."
    return f"Here are the {calls} images you asked for."


def cached_tokens(carried: int) -> int:
    """Prompt caching's hit on a carried prefix: `cached_tokens(1300) == 1280`."""
    return 0 if carried < CACHE_MIN_TOKENS else carried // CACHE_STEP * CACHE_STEP


def image_gen_usage(order: ResponseOrder) -> BilledUsage:
    """`tool_usage.image_gen` of all the order's image calls."""
    if order.tool is None or order.image_calls == 0:
        return BilledUsage()
    tool = order.tool
    one = tokens_for(replace(tool, n=1))
    calls = order.image_calls
    # Call k (from 0) is also given the k images the calls before it made.
    made = image_input_tokens(tool.width, tool.height, high_fidelity=tool.high_fidelity)
    return BilledUsage(
        text_input=one.text_input * calls,
        image_input=one.image_input * calls + made * (calls * (calls - 1) // 2),
        image_output=one.output_per_completed * calls,
    )


def tokens_of(order: ResponseOrder, carried: int = 0) -> ResponseTokens:
    """What a response bills; `carried` is the previous response's input + output tokens."""
    answer = answer_text(order.image_calls) if order.function_call is None else ""
    written = text_tokens(answer)
    if order.function_call is not None:
        written = text_tokens(order.function_call) + text_tokens(order.call_arguments)
    reasoning = REASONING_TOKENS if order.model.reasoning else 0
    calls = order.image_calls * text_tokens(order.revised_prompt) if order.tool else 0
    output = reasoning + calls + written
    incomplete = order.max_output_tokens is not None and output > order.max_output_tokens
    if incomplete and order.max_output_tokens is not None:
        room = max(0, order.max_output_tokens - reasoning - calls)
        answer, output = answer[: room * 4], order.max_output_tokens
    per_image = order.model.image_tokens or MAINLINE_IMAGE_TOKENS
    own = (
        sum(text_tokens(t) for t in order.texts)
        + per_image * len(order.images)
        + order.reasoning_input
    )
    made = order.image_calls if order.tool else 0
    # Sampling j (from 1) after j image calls reads the context again, with what the
    # samplings before it wrote (never more than the response's output) and the j images
    # the calls made.
    prompt = text_tokens(order.revised_prompt) if made else 0
    again = sum(
        own + carried + min(j * prompt + reasoning, output) + j * per_image
        for j in range(1, made + 1)
    )
    cached = cached_tokens(carried)
    mainline = MainlineUsage(
        input=own + carried + again,
        cached_input=cached,
        output=output,
        reasoning=reasoning,
        cache_write=cache_written(order, own + carried + again - cached),
    )
    return ResponseTokens(mainline, image_gen_usage(order), answer, incomplete, own + carried)


def cache_written(order: ResponseOrder, uncached: int) -> int:
    """The input a response writes to the prompt cache, for a model that bills its writes:
    every uncached token it read (the dearer reading of OpenAI's implicit breakpoint)."""
    return uncached if order.model.rates.cache_write is not None else 0


def failed_tokens(tokens: ResponseTokens) -> ResponseTokens:
    """What a response that failed after its image calls bills: no answer text written."""
    written = tokens.mainline.output - text_tokens(tokens.answer)
    mainline = replace(tokens.mainline, output=max(written, tokens.mainline.reasoning))
    return replace(tokens, mainline=mainline, answer="")


def response_entry(
    request_id: str,
    at: float,
    fields: Mapping[str, Any],
    order: ResponseOrder | None,
    tokens: ResponseTokens | None,
    *,
    status: int,
    stream: bool,
    authorization: str | None,
    headers: Mapping[str, str],
    batch_id: str | None = None,
    custom_id: str | None = None,
) -> Entry:
    """The record entry of a response, sent directly or as a batch line: billed when
    `tokens` is given (OpenAI did the work)."""
    tool = order.tool if order else None
    model = fields.get("model")
    return Entry(
        id=request_id,
        time=at,
        endpoint="responses",
        model=tool.model.name if tool else None,
        quality=tool.quality if tool else None,
        size=tool.size if tool else None,
        n=order.image_calls if order else None,
        stream=stream,
        status=status,
        billed=tokens is not None,
        usage=tokens.image_gen if tokens else None,
        images=order.image_calls if order and tokens else 0,
        authorization=authorization,
        headers=headers,
        params={
            k: v
            for k, v in fields.items()
            if k not in ("input", "instructions") and isinstance(v, str | int | float | bool)
        },
        image_count=len(order.images) if order else 0,
        mainline_model=model if isinstance(model, str) else None,
        mainline=tokens.mainline if tokens else None,
        batch_id=batch_id,
        custom_id=custom_id,
    )
