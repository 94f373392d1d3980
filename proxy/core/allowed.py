"""What a team's `allow.params` and `allow.sizes` say of a request's fields (pure).

A rule holds for the value the request runs with, not only for one the client sends: a
field left out runs with OpenAI's default, so it is checked as that default, and refused
(naming the field, the default and the allowed values) when the default is not allowed.
A field with no documented default cannot be checked when left out: it is refused too,
so that the client sends it. Nothing is written into the forwarded request.

OpenAI's defaults (the Images API, `OPENAI-IMAGES.md` §2.1 for generations and §2.2 for
edits, which "match generations"; the Responses API's image tool takes the same models and
fields, Part II §1.2):

    background auto · output_format png · output_compression 100 · moderation auto ·
    stream false · input_fidelity low (§2.2), high on a model that refuses the parameter
    (gpt-image-2: "every input is processed at high fidelity") · response_format b64_json
    on a GPT image model (§3: "b64_json is returned by default … url is not supported"),
    url on DALL·E (the spec's default, §0) · style vivid on DALL·E (the spec's default, §0)

`partial_images` is taken as 0 when left out, as Tollgate's bound already takes it (§2.1:
`0` sends the final image as one event). `user`, `safety_identifier` and the image tool's
`action` have no default.

A field that cannot act on the request is not checked: `input_fidelity` without input
images (it sets how they are read), `output_compression` but for jpeg and webp (§2.1:
"Only with webp or jpeg"), `partial_images` without `stream` ("Streaming only"), `style`
on a GPT image model ("Unsupported for GPT image models").

`auto` in `allow.sizes` is written `auto`: without it, a request whose size is `auto`
(sent, or left out: OpenAI's default, §2.1 and §2.2) is refused, since the model then
chooses a size that may not be on the list.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.core.errors import PolicyViolation
from proxy.core.models import ImageRequest
from proxy.core.pricing import AUTO, ModelPrices
from proxy.core.settings import Allow

DEFAULTS: Mapping[str, str] = {
    "background": "auto",
    "output_format": "png",
    "output_compression": "100",
    "moderation": "auto",
    "stream": "false",
    "partial_images": "0",
}
"""OpenAI's defaults that hold on every model (see the module's docstring)."""
COMPRESSED_FORMATS = frozenset({"jpeg", "webp"})


def size_allowed(allow: Allow, size: str) -> bool:
    """Whether `allow.sizes` lets a request run at `size` (`auto` only where listed)."""
    return allow.sizes is None or size in allow.sizes


def check_size(team: str, allow: Allow, request: ImageRequest) -> None:
    """Refuse a size the team may not request; `auto`, asked or left out, unless listed."""
    if size_allowed(allow, request.size):
        return
    listed = ", ".join(sorted(allow.sizes or ()))
    if request.size != AUTO:
        message = f"Team {team} may not request size {request.size} (allow.sizes: {listed})."
    elif "size" in dict(request.params):
        message = (
            f"Team {team} may not request size auto: the model would choose a size that may "
            f"not be allowed (allow.sizes: {listed}). Send one of the allowed sizes."
        )
    else:
        message = (
            f"Team {team} may not leave size out: it was omitted, and OpenAI's default for it "
            f"is auto, with which the model chooses a size that may not be allowed "
            f"(allow.sizes: {listed}). Send one of the allowed sizes."
        )
    raise PolicyViolation(message, param="size")


def check_params(team: str, allow: Allow, request: ImageRequest, model: ModelPrices) -> None:
    """Refuse a request whose value of a field named by `allow.params`, sent or OpenAI's
    default for a field left out, is not allowed (or cannot be known)."""
    if not allow.params:
        return
    given = dict(request.params)
    for name, allowed in allow.params.items():
        listed = ", ".join(sorted(allowed))
        value = given.get(name)
        if value is not None:
            if value not in allowed:
                raise PolicyViolation(
                    f"Team {team} may not send {name}={value} (allow.params.{name}: {listed}).",
                    param=name,
                )
            continue
        if not applies(name, request, model, given):
            continue
        default = default_of(name, request, model)
        if default is None:
            raise PolicyViolation(
                f"Team {team} may not leave {name} out: OpenAI gives it no default that "
                f"allow.params.{name} ({listed}) could be checked against. Send {name}.",
                param=name,
            )
        if default not in allowed:
            raise PolicyViolation(
                f"Team {team} may not leave {name} out: it was omitted, and OpenAI's default "
                f"for it is {default}, which allow.params.{name} does not allow ({listed}). "
                f"Send {name} with an allowed value.",
                param=name,
            )


def default_of(name: str, request: ImageRequest, model: ModelPrices) -> str | None:
    """The value OpenAI gives `name` when a request of `model` leaves it out; None: none
    is documented."""
    if name == "input_fidelity":
        return "low" if model.accepts_input_fidelity else "high"
    if name == "response_format":
        return "url" if model.per_image_billing else "b64_json"
    if name == "style":
        return "vivid"
    return DEFAULTS.get(name)


def applies(name: str, request: ImageRequest, model: ModelPrices, given: Mapping[str, str]) -> bool:
    """Whether a field left out of `request` can act on it at all (see the docstring)."""
    if name == "input_fidelity":
        return bool(request.images) or request.mask is not None or request.markup is not None
    if name == "output_compression":
        return given.get("output_format", DEFAULTS["output_format"]) in COMPRESSED_FORMATS
    if name == "partial_images":
        return request.stream
    if name == "style":
        return model.per_image_billing
    return True
