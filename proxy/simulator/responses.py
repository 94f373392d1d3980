"""The Responses API with the `image_generation` tool: a JSON body becomes a
`ResponseOrder` or the ApiError OpenAI would answer (pure).

How many images a response makes (OpenAI's model decides; this is the simulator's rule):
    0 when no image_generation tool is offered or `tool_choice` is "none";
    else 1, or N with an `[[images:N]]` marker in the last user text (0 ≤ N ≤
    MAX_IMAGE_CALLS; at least 1 when `tool_choice` requires the tool);
    never more than `max_tool_calls`.
The revised prompt the tool receives is that user text with its `[[…]]` markers removed.
With a `[[call:NAME]]` marker naming a function tool offered (and `tool_choice` not
"none"), the model calls that function instead: the call ends the response (no image, no
message), its arguments the revised prompt as JSON.
Its token rules are in `response_tokens`.

An input message that carries an `id` is read as OpenAI reads it: the item stored under
that id (`Resolver`: an input message or the answer of a stored response), whatever
content the request sends with it; an id nothing was stored under is a 404.

The other input items, as OpenAI reads them into the mainline model's context:
    function_call           its name and arguments, as text; its `call_id` must have a
                            function_call_output in the input ("No tool output found …")
    function_call_output    its output: text, or input_text and input_image parts (the
                            images as a message's); its `call_id` must name a function_call
                            of the input ("No tool call found …")
    reasoning               its `encrypted_content` (as `encrypted_reasoning` writes it):
                            the reasoning tokens it holds, read again as input, and its
                            reasoning_text content; refused for a model that does not
                            reason, and for content the simulator did not write (OpenAI
                            cannot decrypt it); without it, the item stored under its `id`
                            (none is: a 404)
    image_generation_call   its `result`: an image in the context at its size (and given to
                            the image tool, as an image to edit); without it, a 404 for its
                            `id`
Each item may carry only the fields of its type in the SDK's input types (`ITEM_PARAMS`:
what `response.output` sends back whole, but for the SDK's `async_` and a listed item's
`created_by`); any other is OpenAI's "Unknown parameter" 400.
Reasoning items are in the output (first) when `include` names
"reasoning.encrypted_content" and the model reasons, with a summary when
`reasoning.summary` asks for one.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from proxy.core.models import InputImage
from proxy.simulator.catalogue import DEFAULT_TOOL_MODEL, MAINLINE_MODELS, MODELS, MainlineRule
from proxy.simulator.forms import RawRequest, image_size
from proxy.simulator.refusals import ApiError, invalid, missing
from proxy.simulator.validation import ImageOrder, data_url_image, validate

MAX_IMAGE_CALLS = 4
MIN_MAX_OUTPUT_TOKENS = 16
_IMAGES_MARKER = re.compile(r"\[\[images:(\d+)\]\]")
_ANY_MARKER = re.compile(r"\s*\[\[[a-z]+:[a-z0-9]+\]\]\s*")
_CALL_MARKER = re.compile(r"\[\[call:([A-Za-z0-9_-]+)\]\]")
DEFAULT_REVISED_PROMPT = "An image."

TOOL_PARAMS = frozenset(
    {
        "type",
        "action",
        "background",
        "complexity",
        "frame_count",
        "frame_duration_ms",
        "input_fidelity",
        "input_image_mask",
        "model",
        "moderation",
        "output_compression",
        "output_format",
        "partial_images",
        "quality",
        "size",
        "svg",
    }
)
# The SDK's parameters: accepted and, but for the ones the order keeps, without effect.
BODY_PARAMS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "max_tool_calls",
        "stream",
        "stream_options",
        "background",
        "previous_response_id",
        "store",
        "metadata",
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
        "text",
        "reasoning",
        "truncation",
        "include",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "top_logprobs",
        "access_programs",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "moderation",
        "prompt",
        "prompt_cache_options",
        "prompt_cache_retention",
    }
)
ITEM_PARAMS: dict[str, frozenset[str]] = {
    "message": frozenset({"type", "id", "role", "content", "status", "phase"}),
    "function_call": frozenset(
        {"type", "id", "call_id", "name", "arguments", "namespace", "status", "caller", "async"}
    ),
    "function_call_output": frozenset(
        {"type", "id", "call_id", "output", "name", "namespace", "status", "caller"}
    ),
    "reasoning": frozenset({"type", "id", "summary", "content", "encrypted_content", "status"}),
    "image_generation_call": frozenset(
        {
            "type", "id", "result", "status", "action", "background", "output_format",
            "quality", "size", "revised_prompt", "error", "svg_usage",
        }
    ),
}  # fmt: skip
"""The fields of each input item OpenAI takes (the SDK's `response_input_param.py`)."""
PHASES = ("commentary", "final_answer")
SUMMARIES = ("auto", "concise", "detailed")
TOOL_CHOICES = ("none", "auto", "required")
ROLES = ("user", "system", "developer", "assistant")
Action = Literal["generate", "edit"]
StoredItem = tuple[list[str], list[InputImage]]
Resolver = Callable[[str, bool], StoredItem]
"""The texts and images stored under an item id (given whether the request is stored), or
the ApiError OpenAI answers for an id it stored nothing under."""


@dataclass(frozen=True)
class ResponseOrder:
    """A valid Responses request: what the simulator will answer and bill."""

    model: MainlineRule
    texts: tuple[str, ...]
    """The instructions and every input text, as the mainline model reads them."""
    prompt: str
    """The last user text, the fault markers found in it included."""
    messages: tuple[dict[str, Any], ...]
    """The input as message items (for `input_items`)."""
    images: tuple[InputImage, ...]
    tool: ImageOrder | None
    """The image_generation tool's order for one call (None: no image tool offered)."""
    tools: tuple[dict[str, Any], ...]
    tool_choice: str | dict[str, Any]
    image_calls: int
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    instructions: str | None = None
    reasoning_input: int = 0
    """The reasoning tokens of the input's reasoning items, read again as input."""
    encrypted_reasoning: bool = False
    """`include` names "reasoning.encrypted_content": the reasoning item is in the output."""
    summary: bool = False
    """`reasoning.summary` asks for a summary: the reasoning item carries one."""
    function_call: str | None = None
    """The function the model calls (a `[[call:NAME]]` marker), ending the response."""

    @property
    def call_arguments(self) -> str:
        return json.dumps({"request": self.revised_prompt})

    @property
    def revised_prompt(self) -> str:
        return revised(self.prompt)

    @property
    def action(self) -> Action:
        return "edit" if self.images else "generate"


def revised(prompt: str) -> str:
    """The prompt the mainline model hands the image tool: the user's, markers removed."""
    prompt = _CALL_MARKER.sub(" ", prompt)
    return _ANY_MARKER.sub(" ", prompt).strip() or DEFAULT_REVISED_PROMPT


def _function_call(prompt: str, tools: tuple[dict[str, Any], ...], choice: Any) -> str | None:
    """The function tool a `[[call:NAME]]` marker names, when offered and callable."""
    marked = _CALL_MARKER.search(prompt)
    offered = {t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"}
    if marked is None or choice == "none" or marked[1] not in offered:
        return None
    return marked[1]


def _typed(value: Any, kind: type, param: str, expected: str) -> Any:
    """`value` when it is None or of `kind` (a bool is no integer), else OpenAI's 400."""
    if value is None or (isinstance(value, kind) and (kind is bool or type(value) is not bool)):
        return value
    raise invalid(
        f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__}.",
        param=param,
        code="invalid_type",
    )


def _minimum(value: int | None, low: int, param: str) -> None:
    if value is not None and value < low:
        raise invalid(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )


def _unknown(keys: Any, known: frozenset[str], prefix: str) -> None:
    for key in keys:
        if key not in known:
            raise invalid(
                f"Unknown parameter: '{prefix}{key}'.",
                param=f"{prefix}{key}",
                code="unknown_parameter",
            )


def _part(part: Any, param: str) -> tuple[str | None, InputImage | None, dict[str, Any]]:
    """One content part: its text or image, and the part as stored."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return part["text"], None, {"type": kind, "text": part["text"]}
    if kind == "input_image":
        ref = part.get("image_url") or part.get("file_id")
        if isinstance(ref, str) and ref:
            stored = {"type": "input_image", "detail": part.get("detail") or "auto"}
            stored.update({k: part[k] for k in ("image_url", "file_id") if part.get(k)})
            return None, data_url_image(ref), stored
        raise invalid(
            f"Invalid '{param}': an input_image needs an 'image_url' or a 'file_id'.",
            param=param,
        )
    raise invalid(
        f"Invalid value: '{kind}'. Supported values are: 'input_text', 'output_text' and "
        "'input_image'.",
        param=f"{param}.type",
    )


def _message(
    item: Any, index: int, resolve: Resolver | None, store: bool
) -> tuple[str, list[str], list[InputImage], dict[str, Any]]:
    """One input item: its role, texts, images and the message item as stored; with an
    `id`, the texts and images are the ones stored under it."""
    param = f"input[{index}]"
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise invalid(f"Invalid '{param}': the simulator accepts message items only.", param=param)
    _unknown(item, ITEM_PARAMS["message"], f"{param}.")
    phase = item.get("phase")
    if phase is not None and phase not in PHASES:
        raise invalid(
            f"Invalid value: '{phase}'. Supported values are: 'commentary' and 'final_answer'.",
            param=f"{param}.phase",
        )
    role = item.get("role")
    if role not in ROLES:
        raise invalid(
            f"Invalid value: '{role}'. Supported values are: 'user', 'system', 'developer', "
            "and 'assistant'.",
            param=f"{param}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise missing(f"{param}.content")
    texts, images, parts = [], [], []
    for n, raw in enumerate(content):
        text, image, stored = _part(raw, f"{param}.content[{n}]")
        texts += [text] if text is not None else []
        images += [image] if image is not None else []
        parts.append(stored)
    item_id = item.get("id")
    if item_id is not None and resolve is not None:
        if not isinstance(item_id, str) or not item_id:
            raise invalid(f"Invalid '{param}.id': expected a string.", param=f"{param}.id")
        texts, images = resolve(item_id, store)
    return role, texts, images, {"type": "message", "role": role, "content": parts}


ENCRYPTED_PREFIX = "gAAAAAB"
ENCRYPTED_BYTES_PER_TOKEN = 4


def encrypted_reasoning(tokens: int, response_id: str) -> str:
    """The `encrypted_content` of a response's reasoning: opaque, as long as the reasoning
    text it holds (about 4 bytes a token, as ciphertext), its tokens readable back."""
    head = json.dumps({"tokens": tokens, "response": response_id}, separators=(",", ":"))
    plain = f"{head}\n".encode() + b"." * (tokens * ENCRYPTED_BYTES_PER_TOKEN)
    return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(plain).decode()


def _reasoning_tokens(value: str, param: str) -> int:
    """The tokens an `encrypted_content` holds, or OpenAI's 400 when it cannot read it."""
    try:
        if not value.startswith(ENCRYPTED_PREFIX):
            raise ValueError(value)
        plain = base64.urlsafe_b64decode(value.removeprefix(ENCRYPTED_PREFIX))
        head = json.loads(plain.split(b"\n", 1)[0])
        tokens = head["tokens"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(value)
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise invalid(
            f"The encrypted content for item {param} could not be verified.",
            param=param,
            code="invalid_encrypted_content",
        ) from None
    return int(tokens)


def _result_image(result: Any) -> InputImage | None:
    """An image_generation_call's `result` (base64, no data URL) at its size."""
    if not isinstance(result, str) or not result:
        return None
    try:
        size = image_size(base64.b64decode(result, validate=True))
    except binascii.Error:
        return InputImage()
    return InputImage(*size) if size else InputImage()


@dataclass
class _Read:
    """The input as read so far."""

    prompt: str = ""
    texts: list[str] | None = None
    images: list[InputImage] | None = None
    messages: list[dict[str, Any]] | None = None
    reasoning: int = 0
    reasoning_items: int = 0
    calls: dict[str, int] | None = None
    outputs: dict[str, int] | None = None


def _by_id(item: dict[str, Any], param: str, resolve: Resolver | None, store: bool) -> StoredItem:
    """An item named by its id alone: what is stored under it, or OpenAI's answers."""
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise missing(f"{param}.id")
    if resolve is None:
        return [], []
    return resolve(item_id, store)


def _other_item(
    item: dict[str, Any], index: int, read: _Read, resolve: Resolver | None, store: bool
) -> None:
    """An input item that is no message, read into `read`."""
    assert read.texts is not None and read.images is not None
    assert read.calls is not None and read.outputs is not None
    param = f"input[{index}]"
    kind = item.get("type")
    if isinstance(kind, str) and kind in ITEM_PARAMS:
        _unknown(item, ITEM_PARAMS[kind], f"{param}.")
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise missing(f"{param}.{name}")
        read.texts += [item["name"], item["arguments"]]
        read.calls.setdefault(item["call_id"], index)
    elif kind == "function_call_output":
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise missing(f"{param}.call_id")
        output = item.get("output")
        if isinstance(output, str):
            output = [{"type": "input_text", "text": output}]
        if not isinstance(output, list):
            raise missing(f"{param}.output")
        for n, raw in enumerate(output):
            text, image, _ = _part(raw, f"{param}.output[{n}]")
            read.texts += [text] if text is not None else []
            read.images += [image] if image is not None else []
        read.outputs.setdefault(call_id, index)
    elif kind == "reasoning":
        read.reasoning_items += 1
        encrypted = item.get("encrypted_content")
        if isinstance(encrypted, str) and encrypted:
            read.reasoning += _reasoning_tokens(encrypted, param)
        else:
            texts, images = _by_id(item, param, resolve, store)
            read.texts += texts
            read.images += images
        for n, part in enumerate(item.get("content") or []):
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise invalid(f"Invalid '{param}.content[{n}]'.", param=f"{param}.content[{n}]")
            read.texts.append(part["text"])
    elif kind == "image_generation_call":
        image = _result_image(item.get("result"))
        if image is None:
            texts, images = _by_id(item, param, resolve, store)
            read.texts += texts
            read.images += images
        else:
            read.images.append(image)
    else:
        raise invalid(
            f"Invalid value: '{kind}'. The simulator supports message, function_call, "
            "function_call_output, reasoning and image_generation_call items.",
            param=f"{param}.type",
        )


def _input(value: Any, resolve: Resolver | None = None, store: bool = True) -> _Read:
    """The input: the last user text, all texts, the images, the message items and the
    reasoning tokens fed back."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise missing("input")
    read = _Read(texts=[], images=[], messages=[], calls={}, outputs={})
    assert read.texts is not None and read.images is not None and read.messages is not None
    assert read.calls is not None and read.outputs is not None
    for index, item in enumerate(value):
        if isinstance(item, dict) and item.get("type", "message") != "message":
            _other_item(item, index, read, resolve, store)
            continue
        role, item_texts, item_images, stored = _message(item, index, resolve, store)
        if role == "user" and item_texts:
            read.prompt = item_texts[-1]
        read.texts += item_texts
        read.images += item_images
        read.messages.append(stored)
    for call_id in read.outputs:
        if call_id not in read.calls:
            raise invalid(
                f"No tool call found for function call output with call_id {call_id}.",
                param="input",
            )
    for call_id in read.calls:
        if call_id not in read.outputs:
            raise invalid(f"No tool output found for function call {call_id}.", param="input")
    return read


def _image_tool(tool: dict[str, Any], index: int, stream: bool, prompt: str) -> ImageOrder:
    """The tool's order for one call, checked by the Images path's validation."""
    prefix = f"tools[{index}]."
    _unknown(tool, TOOL_PARAMS, prefix)
    name = tool.get("model") or DEFAULT_TOOL_MODEL
    model = MODELS.get(name) if isinstance(name, str) else None
    if model is None or model.is_dalle:
        names = ", ".join(f"'{m}'" for m, rule in MODELS.items() if not rule.is_dalle)
        raise invalid(
            f"Invalid value: '{name}'. Supported values are: {names}.", param=f"{prefix}model"
        )
    enums: dict[str, tuple[str, ...]] = {
        "action": ("generate", "edit", "auto"),
        "moderation": ("auto", "low"),
    }
    for key, allowed in enums.items():
        value = _typed(tool.get(key), str, prefix + key, "a string")
        if value is not None and value not in allowed:
            choices = ", ".join(f"'{v}'" for v in allowed)
            raise invalid(
                f"Invalid value: '{value}'. Supported values are: {choices}.", param=prefix + key
            )
    # The Images path checks what the two APIs share; the rest has no effect here.
    shared = ("model", "quality", "size", "output_format", "output_compression", "background")
    fields = {k: v for k, v in tool.items() if k in (*shared, "partial_images", "input_fidelity")}
    fields.update(model=name, prompt=prompt, stream=True)
    try:
        order = validate(RawRequest("generations", "json", fields))
    except ApiError as error:
        param = f"{prefix}{error.param}" if error.param else None
        raise ApiError(error.status, error.message, param=param, code=error.code) from error
    return replace(order, stream=stream, partial_images=order.partial_images if stream else 0)


def _tool_choice(value: Any) -> str | dict[str, Any]:
    if value is None:
        return "auto"
    if isinstance(value, str) and value in TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "image_generation":
        return {"type": "image_generation"}
    raise invalid(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'image_generation'}.",
        param="tool_choice",
    )


def _tools(
    value: Any, stream: bool, prompt: str
) -> tuple[tuple[dict[str, Any], ...], ImageOrder | None]:
    """The tools as sent and the image tool's order (function tools are offered, never
    called)."""
    value = _typed(value, list, "tools", "an array")
    tool = None
    for index, item in enumerate(value or []):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "function" and isinstance(item.get("name"), str):
            continue  # the model never calls it here: the client's function, offered
        if kind != "image_generation":
            raise invalid(
                f"Invalid value: '{kind}'. The simulator supports 'image_generation' and "
                "'function' only.",
                param=f"tools[{index}].type",
            )
        if tool is not None:
            raise invalid(
                "Duplicate tool: 'image_generation' may be given once.", param=f"tools[{index}]"
            )
        tool = _image_tool(item, index, stream, prompt)
    return tuple(value or ()), tool


def _image_calls(prompt: str, tool: ImageOrder | None, choice: Any, cap: int | None) -> int:
    if tool is None or choice == "none":
        return 0
    marked = _IMAGES_MARKER.search(prompt)
    calls = min(int(marked[1]), MAX_IMAGE_CALLS) if marked else 1
    if choice != "auto":
        calls = max(calls, 1)
    return calls if cap is None else min(calls, cap)


def read_order(body: dict[str, Any], resolve: Resolver | None = None) -> ResponseOrder:
    """The order a Responses body describes, or the ApiError OpenAI would answer it with;
    `resolve` reads the items stored under the ids the input names (None: ids unread)."""
    _unknown(body, BODY_PARAMS, "")
    name = _typed(body.get("model"), str, "model", "a string")
    if not name:
        raise missing("model")
    model = MAINLINE_MODELS.get(name)
    if model is None:
        raise invalid(
            f"The requested model '{name}' does not exist or cannot use the image_generation tool.",
            param="model",
            code="model_not_found",
        )
    instructions = _typed(body.get("instructions"), str, "instructions", "a string")
    store = _typed(body.get("store"), bool, "store", "a boolean") is not False
    read = _input(body.get("input"), resolve, store)
    prompt = read.prompt
    texts, images, messages = read.texts or [], read.images or [], read.messages or []
    if read.reasoning_items and not model.reasoning:
        raise invalid(
            "Reasoning input items can only be provided to a reasoning or computer use "
            "model. Remove reasoning items from your input and try again.",
            param="input",
        )
    include = _typed(body.get("include"), list, "include", "an array") or []
    stream = bool(_typed(body.get("stream"), bool, "stream", "a boolean"))
    background = bool(_typed(body.get("background"), bool, "background", "a boolean"))
    if background and not store:
        raise invalid("Background mode requires 'store' to be true.", param="background")
    tools, tool = _tools(body.get("tools"), stream, revised(prompt))
    max_output = _typed(body.get("max_output_tokens"), int, "max_output_tokens", "an integer")
    _minimum(max_output, MIN_MAX_OUTPUT_TOKENS, "max_output_tokens")
    max_calls = _typed(body.get("max_tool_calls"), int, "max_tool_calls", "an integer")
    _minimum(max_calls, 1, "max_tool_calls")
    choice = _tool_choice(body.get("tool_choice"))
    if choice != "auto" and choice != "none" and tool is None:
        raise invalid("Tool choice 'required' needs a tool in 'tools'.", param="tool_choice")
    called = _function_call(prompt, tools, choice)
    return ResponseOrder(
        model=model,
        texts=(*([instructions] if instructions else []), *texts),
        prompt=prompt,
        messages=tuple(messages),
        images=tuple(images),
        tool=replace(tool, images=tuple(images)) if tool else None,
        tools=tools,
        tool_choice=choice,
        image_calls=0 if called else _image_calls(prompt, tool, choice, max_calls),
        max_output_tokens=max_output,
        max_tool_calls=max_calls,
        stream=stream,
        background=background,
        store=store,
        previous_response_id=_typed(
            body.get("previous_response_id"), str, "previous_response_id", "a string"
        ),
        instructions=instructions,
        reasoning_input=read.reasoning,
        encrypted_reasoning="reasoning.encrypted_content" in include,
        summary=_summary(body.get("reasoning")),
        function_call=called,
    )


def _summary(reasoning: Any) -> bool:
    """Whether `reasoning` asks for a summary of the model's reasoning."""
    reasoning = _typed(reasoning, dict, "reasoning", "an object") or {}
    summary = reasoning.get("summary")
    if summary is not None and summary not in SUMMARIES:
        raise invalid(
            f"Invalid value: '{summary}'. Supported values are: 'auto', 'concise' and 'detailed'.",
            param="reasoning.summary",
        )
    return summary is not None
