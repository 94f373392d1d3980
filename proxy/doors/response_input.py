"""The `input` of a Responses request, read for what its bound needs (pure): the bytes of
image data in it (not text), its images, and the files it names.

An item is forwarded only when what the upstream reads of it is in the request itself:
messages (text and images), function calls and their outputs, reasoning with its
`encrypted_content`, image calls with their `result`. An item named by its id alone makes
the upstream read what it stored under that id, whichever team stored it, at a cost
Tollgate cannot see; such items, item references and file inputs are refused. And since
the upstream looks an item's `id` up in its store even when the item's content is sent
with it (answering 404 for an id it stored nothing under), and may read what it stored
instead, no item is forwarded with its `id` (`without_ids`): it is read as sent, and
another team's ids name nothing.
"""

from __future__ import annotations

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


def without_ids(value: Any) -> Any:
    """The request's `input` (already checked) as forwarded: each item without its `id`.

    OpenAI looks an item's id up in its store, the company key's, and may read what it
    stored there rather than what is sent: named by another team's item ids, an item
    would read that team's messages, reasoning or images into the context (and their
    existence would show in a 404 or not), billed as input Tollgate never saw. Sent
    without its id, an item is read as sent (its text, its image's `result`, its
    reasoning's `encrypted_content`), as the stateless use of the API sends items
    (`store: false`, where an id fails)."""
    if not isinstance(value, list):
        return value
    return [{k: v for k, v in item.items() if k != "id"} for item in value]


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
