"""The `input` of a Responses request, read for what its bound needs (pure): the bytes of
image data in it (not text), its images, and the files it names.

An item is forwarded only when what the upstream reads of it is in the request itself:
messages (text and images), function calls and their outputs, reasoning with its
`encrypted_content`, image calls with their `result`. An item named by its id alone makes
the upstream read what it stored under that id, whichever team stored it, at a cost
Tollgate cannot see; such items, item references and file inputs are refused. And since
the upstream looks an item's `id` up in its store even when the item's content is sent
with it (answering 404 for an id it stored nothing under), and may read what it stored
instead, no item is forwarded with its `id` (`as_forwarded`): it is read as sent, and
another team's ids name nothing.

An item is forwarded with only the fields OpenAI documents for its type (`ITEM_FIELDS`,
from the SDK's input and output item types: `input += response.output` sends output
items back whole), each value within a rule (`_item_fields`); an item with any other
field is refused, as a content part is, since a field Tollgate has no rule for may be one
OpenAI bills for. The echo-only fields OpenAI's input does not take (`created_by`, of a
listed input item; `async_`, the Python SDK's spelling of `async`, at its default) are
dropped with the id (`as_forwarded`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.core.errors import InvalidRequest

TEXT_ITEMS: dict[str, tuple[str, ...]] = {"function_call": ("call_id", "name", "arguments")}
"""Items that are text, each with the fields that must carry it: without them the
upstream would read the item it stored under the item's id."""
ROLES = ("user", "assistant", "system", "developer")
PART_FIELDS: dict[str, frozenset[str]] = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
    "refusal": frozenset({"type", "refusal"}),
    "summary_text": frozenset({"type", "text"}),
    "input_image": frozenset({"type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"}),
}
"""The content parts forwarded, each with the fields it may carry: a field Tollgate has
no rule for may be one OpenAI bills for (as a breakpoint bills cache writes), so a part
with any other is refused rather than forwarded unread."""
ITEM_FIELDS: dict[str, frozenset[str]] = {
    "message": frozenset({"type", "id", "role", "content", "status", "phase"}),
    "function_call": frozenset(
        {
            "type", "id", "call_id", "name", "arguments", "namespace", "status", "caller",
            "async", "async_", "created_by",
        }
    ),
    "function_call_output": frozenset(
        {"type", "id", "call_id", "output", "name", "namespace", "status", "caller", "created_by"}
    ),
    "reasoning": frozenset({"type", "id", "summary", "content", "encrypted_content", "status"}),
    "image_generation_call": frozenset(
        {
            "type", "id", "result", "status", "action", "background", "output_format",
            "quality", "size", "revised_prompt", "error", "svg_usage",
        }
    ),
}  # fmt: skip
"""The fields of each input item forwarded: the union of its SDK input type and its
output item type (the fields `response.output` and the input-items list carry back).
Text fields (a name, a namespace, a revised prompt, reasoning summaries) are text bytes
of the body, within the bound; the others are held to the values `_item_fields` checks."""
DROPPED = frozenset({"id", "created_by", "async_"})
"""Item fields read but not forwarded: the id (the upstream would read what it stored
under it), the actor of a listed item (no input field), and the Python SDK's `async_`
(only at its default, false or null, which is OpenAI's)."""
STATUSES = ("in_progress", "completed", "incomplete")
PHASES = ("commentary", "final_answer")
IMAGE_FORMATS = ("png", "webp", "jpeg")
"""The formats of an image call given back: a GIF's frames or an SVG's text are read in a
way Tollgate has no rule for (and Tollgate makes neither)."""
REASONING_PARTS = {"summary": "summary_text", "content": "reasoning_text"}
TEXT_FIELDS = ("namespace", "name", "created_by", "revised_prompt")
ECHOED = ("action", "background", "quality", "size")
"""An image call's record of how it was made: text that changes nothing it is read for."""


def read_input(value: Any) -> tuple[int, int]:
    """(bytes of image data, images) in the request's `input`, every item checked."""
    if value is None or isinstance(value, str):
        return 0, 0  # no input (a continued response may have none): the upstream decides
    if not isinstance(value, list):
        raise InvalidRequest(
            "Invalid type for 'input': expected a string or an array.", param="input"
        )
    data = images = 0
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"Invalid '{param}': expected an object.", param=param)
        kind = item.get("type", "message")
        if kind in ITEM_FIELDS:
            _item_fields(item, kind, param)
        if kind == "message":
            if item.get("role") not in ROLES:
                # Without its role an item is no message: the upstream may read it as an
                # item reference (`{"id": …}`), stored content Tollgate cannot bound.
                raise InvalidRequest(
                    f"Invalid '{param}.role': a message needs a role, one of {', '.join(ROLES)}.",
                    param=f"{param}.role",
                )
            item_data, item_images = content_of(item.get("content"), param)
        elif kind == "function_call_output":
            # Its output is text, or content parts: images are in the context like a
            # message's, and files are refused as they are in a message.
            item_data, item_images = content_of(item.get("output"), param, "output")
        elif kind == "image_generation_call":
            # An image made earlier, given back: it is in the context, not text.
            result = item.get("result")
            if not isinstance(result, str) or not result:
                # Named by its id alone, the upstream reads the image it stored, whichever
                # team made it: the company key would show one team another's images.
                raise InvalidRequest(
                    f"Tollgate does not forward an image_generation_call item without its "
                    f"'result' ('{param}'): the upstream would read the image it stored by "
                    "its id, which Tollgate cannot check is your team's. Continue with "
                    "previous_response_id, or send the item back whole, with its result.",
                    param=f"{param}.result",
                )
            item_data, item_images = len(result), 1
        elif kind in TEXT_ITEMS:
            for name in TEXT_ITEMS[kind]:
                if not isinstance(item.get(name), str):
                    raise InvalidRequest(
                        f"Missing required parameter: '{param}.{name}'. Tollgate forwards a "
                        f"{kind} item with its text, never named by its id alone.",
                        param=f"{param}.{name}",
                    )
            continue
        elif kind == "reasoning":
            encrypted = item.get("encrypted_content")
            if not isinstance(encrypted, str) or not encrypted:
                # Named by its id alone (an empty encrypted_content carries no reasoning), the
                # upstream reads the reasoning it stored, whichever team's: tokens billed
                # again as input that Tollgate cannot see, so cannot bound.
                raise InvalidRequest(
                    f"Tollgate does not forward a reasoning item without its "
                    f"'encrypted_content' ('{param}'): the upstream would read the reasoning "
                    "it stored, whose tokens Tollgate cannot bound. Continue with "
                    "previous_response_id, or ask for include: "
                    "['reasoning.encrypted_content'] and send the items back whole.",
                    param=f"{param}.encrypted_content",
                )
            continue
        else:
            raise InvalidRequest(
                f"Tollgate does not forward input items of type {kind!r}: it cannot bound "
                "their tokens. Send messages (text and images), function calls and their "
                "outputs.",
                param=f"{param}.type",
            )
        data += item_data
        images += item_images
    return data, images


def as_forwarded(value: Any) -> Any:
    """The request's `input` (already checked) as forwarded: each item without its `id`
    (nor the echo-only fields of `DROPPED`).

    OpenAI looks an item's id up in its store, the company key's, and may read what it
    stored there rather than what is sent: named by another team's item ids, an item
    would read that team's messages, reasoning or images into the context (and their
    existence would show in a 404 or not), billed as input Tollgate never saw. Sent
    without its id, an item is read as sent (its text, its image's `result`, its
    reasoning's `encrypted_content`), as the stateless use of the API sends items
    (`store: false`, where an id fails)."""
    if not isinstance(value, list):
        return value
    return [{k: v for k, v in item.items() if k not in DROPPED} for item in value]


def _item_fields(item: Mapping[str, Any], kind: str, param: str) -> None:
    """Refuse a field of `item` (at `param`) outside `ITEM_FIELDS`, or at a value Tollgate
    has no rule for."""
    fields = ITEM_FIELDS[kind]
    unknown = next((field for field in item if field not in fields), None)
    if unknown is not None:
        documented = ", ".join(sorted(fields - DROPPED - {"type"}))
        raise InvalidRequest(
            f"Tollgate does not forward '{param}.{unknown}': it forwards a {kind} item with "
            f"only its {documented} (the fields OpenAI documents for it), since a field it "
            "has no rule for may be one OpenAI bills for. Leave it out.",
            param=f"{param}.{unknown}",
        )

    def refuse(name: str, allowed: str) -> InvalidRequest:
        return InvalidRequest(
            f"Tollgate does not forward '{param}.{name}' at {json.dumps(item[name])}: it "
            f"forwards a {kind} item's {name} only as {allowed}.",
            param=f"{param}.{name}",
        )

    statuses = ("completed",) if kind == "image_generation_call" else STATUSES
    # An image call not done, a call the model did not wait for (`async`), one made by a
    # program OpenAI runs (whose item it would look up by `caller_id`): read in ways
    # Tollgate has no rule for. Null is what `model_dump()` writes for a field left unset.
    rules: dict[str, tuple[tuple[object, ...], str]] = {
        "status": (statuses, " or ".join(statuses)),
        "phase": (PHASES, " or ".join(PHASES)),
        "output_format": (IMAGE_FORMATS, ", ".join(IMAGE_FORMATS)),
        "async": ((False,), "false"),
        "async_": ((False,), "false"),
        "svg_usage": ((), "null (an SVG's text is read in a way Tollgate has no rule for)"),
    }
    for name, (allowed, said) in rules.items():
        value = item.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise refuse(name, said)
    caller = item.get("caller")
    if caller is not None and caller != {"type": "direct"}:
        raise refuse("caller", "{'type': 'direct'} (a call the client made)")
    for name in (*TEXT_FIELDS, *(ECHOED if kind == "image_generation_call" else ())):
        if item.get(name) is not None and not isinstance(item[name], str):
            raise InvalidRequest(
                f"Invalid type for '{param}.{name}': expected a string.", param=f"{param}.{name}"
            )
    if item.get("error") is not None and not isinstance(item["error"], dict):
        raise InvalidRequest(
            f"Invalid type for '{param}.error': expected an object.", param=f"{param}.error"
        )
    if kind == "reasoning":
        for name, part_kind in REASONING_PARTS.items():
            _reasoning_parts(item.get(name), f"{param}.{name}", part_kind)


def _reasoning_parts(parts: Any, where: str, kind: str) -> None:
    """A reasoning item's summary or content: parts of `kind` with their text alone."""
    if parts is None:
        return
    if not isinstance(parts, list):
        raise InvalidRequest(f"Invalid type for '{where}': expected an array.", param=where)
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        if not isinstance(part, dict) or part.get("type") != kind:
            raise InvalidRequest(
                f"Invalid '{at}': expected a part of type {kind!r}.", param=f"{at}.type"
            )
        unknown = next((field for field in part if field not in ("type", "text")), None)
        if unknown is not None:
            raise InvalidRequest(
                f"Tollgate does not forward '{at}.{unknown}': it has no rule for what "
                "OpenAI bills for it. Leave it out.",
                param=f"{at}.{unknown}",
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"Missing required parameter: '{at}.text'.", param=f"{at}.text")


def content_of(content: Any, param: str, name: str = "content") -> tuple[int, int]:
    """(bytes of image data, images) in the content parts `content` of `param`."""
    if isinstance(content, str):
        return 0, 0
    if not isinstance(content, list):
        raise InvalidRequest(f"Missing required parameter: '{param}.{name}'.", param=param)
    data = images = 0
    for index, part in enumerate(content):
        where = f"{param}.{name}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        fields = PART_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            raise InvalidRequest(
                f"Tollgate does not forward content of type {kind!r}: it cannot bound its "
                "tokens. Send input_text and input_image.",
                param=f"{where}.type",
            )
        unknown = next((field for field in part if field not in fields), None)
        if unknown is not None:
            raise InvalidRequest(
                f"Tollgate does not forward '{where}.{unknown}': it has no rule for what "
                "OpenAI bills for it. Leave it out.",
                param=f"{where}.{unknown}",
            )
        if part.get("prompt_cache_breakpoint") is not None:
            # The part-level spelling of `prompt_cache_options` (refused with the request's
            # other parameters Tollgate has no rule for): a breakpoint makes OpenAI write the
            # prompt cache, for up to 12 hours, billed as cache writes the price book has no
            # rate for.
            raise InvalidRequest(
                f"Tollgate does not forward '{where}.prompt_cache_breakpoint' yet: it writes "
                "OpenAI's prompt cache, whose cost Tollgate has no rule for. Leave it out.",
                param=f"{where}.prompt_cache_breakpoint",
            )
        if kind != "input_image":
            continue
        url = part.get("image_url")
        if not isinstance(url, str) and not isinstance(part.get("file_id"), str):
            raise InvalidRequest(
                f"Invalid '{where}': an input_image needs an 'image_url' or a 'file_id'.",
                param=where,
            )
        data += len(url) if isinstance(url, str) and url.startswith("data:") else 0
        images += 1
    return data, images


def named_files(value: Any, tool: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The file ids of the input images of `value` (an `input` already checked) and of the
    tool's mask."""
    found: list[str] = []
    for item in value if isinstance(value, list) else ():
        kind = item.get("type", "message")
        parts = item.get("content" if kind == "message" else "output")
        if kind not in ("message", "function_call_output") or not isinstance(parts, list):
            continue
        for part in parts:
            if part.get("type") == "input_image" and isinstance(part.get("file_id"), str):
                found.append(part["file_id"])
    mask = (tool or {}).get("input_image_mask")
    if isinstance(mask, dict) and isinstance(mask.get("file_id"), str):
        found.append(mask["file_id"])
    return tuple(dict.fromkeys(found))
