"""The Images API: `POST /v1/images/{generations,edits,variations}` (pure)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from proxy.core.asked import images_asked
from proxy.core.budgets import Variant, apply_allow
from proxy.core.errors import RequestError, UnpricedModel
from proxy.core.metering import BodyMeter, SseMeter
from proxy.core.models import Asked, Endpoint, ImageRequest
from proxy.core.parsing import ParsedBody, parse_request
from proxy.core.pricing import ModelPrices, PriceBook
from proxy.core.settings import Config, Limits, Team
from proxy.core.settlement import Bound, Metered, StreamEnd
from proxy.core.sse import error_event


@dataclass(frozen=True, slots=True)
class ImagesDoor:
    """One endpoint of the Images API."""

    endpoint: Endpoint

    @property
    def upstream_path(self) -> str:
        return f"/images/{self.endpoint}"

    def body_limit(self, limits: Limits) -> int:
        return {
            "generations": limits.generations_bytes,
            "edits": limits.edits_bytes,
            "variations": limits.variations_bytes,
        }[self.endpoint]

    def parse(self, content_type: str, body: bytes, config: Config, team: Team) -> ParsedBody:
        return parse_request(self.endpoint, content_type, body, config.default_model)

    def request(self, parsed: ParsedBody) -> ImageRequest:
        return parsed.request

    def asked(self, content_type: str, body: bytes, config: Config) -> Asked:
        return images_asked(self.endpoint, content_type, body, config.default_model)

    def names_model(self, parsed: ParsedBody) -> bool:
        return parsed.names_model

    def file_ids(self, parsed: ParsedBody) -> tuple[str, ...]:
        references = parsed.references or {}
        refs = [*references.get("images", ()), references.get("mask") or {}]
        return tuple(dict.fromkeys(r["file_id"] for r in refs if "file_id" in r))

    def previous(self, parsed: ParsedBody) -> str | None:
        return None

    def carry(self, parsed: ParsedBody, tokens: int, images: int) -> ParsedBody:
        return parsed

    def injected(self, parsed: ParsedBody) -> str:
        return ""

    def digest(self, parsed: ParsedBody) -> bytes:
        return content_digest(parsed)

    def admit(self, team: Team, parsed: ParsedBody, config: Config) -> Variant:
        model = priced(config.prices, parsed.request.model)
        config.prices.check_endpoint(model, self.endpoint)
        model.validate(parsed.request)
        return apply_allow(team, parsed.request, model)

    def bound(self, parsed: ParsedBody, variant: Variant) -> Bound:
        return Bound.of(variant)

    def encode(self, parsed: ParsedBody, variant: Variant) -> tuple[bytes, str]:
        sent = variant.request
        changes: dict[str, str] = {c.knob: str(getattr(sent, c.knob)) for c in variant.changes}
        if (
            "model" in changes
            and variant.model.per_image_billing
            and "response_format" not in parsed.fields
        ):
            # A GPT image model always answers `b64_json`, which its client reads; DALL·E
            # answers URLs unless asked for base64: a fallback to it is asked so.
            changes["response_format"] = "b64_json"
        return parsed.encode(changes)

    def answer_meter(self) -> ImageAnswer:
        return ImageAnswer()

    def stream_meter(self) -> ImageEvents:
        return ImageEvents()


class ImageAnswer:
    """An image answer: its `usage` and the images in its `data`."""

    def __init__(self) -> None:
        self._meter = BodyMeter()

    def feed(self, chunk: bytes) -> None:
        self._meter.feed(chunk)

    def finish(self) -> Metered:
        usage, images = self._meter.finish()
        return Metered(usage, images)


class ImageEvents:
    """An image stream ends with one `*.completed` event per image, each with its usage;
    an `error` event ends it without an image."""

    def __init__(self) -> None:
        self._meter = SseMeter()
        self.response_id: str | None = None  # an image stream names no response

    def feed(self, chunk: bytes) -> None:
        self._meter.feed(chunk)

    def end(self, broken: str | None) -> StreamEnd:
        meter = self._meter
        if broken is None:
            meter.finish()  # a last event may lack its blank line
        return StreamEnd(
            meter.completed,
            meter.usage,
            meter.error,
            meter.unreadable,
            broken,
            unmetered=meter.unmetered,
            partials=meter.partials,
        )

    def cut_short(self, failure: RequestError) -> bytes:
        """An `error` event: the client's connection is not broken as the upstream's was,
        so without it the stream would end for its SDK as if whole."""
        message = f"The upstream's stream broke off before its end. {failure.message}"
        error = {**failure.body()["error"], "message": message}
        return error_event(error, inside=self._meter.inside)


def priced(book: PriceBook, name: str) -> ModelPrices:
    """The price-book entry of model `name`; UnpricedModel when there is none."""
    model = book.find(name)
    if model is None:
        raise UnpricedModel(
            f"Model {name!r} is not in Tollgate's price book, so its cost cannot be metered. "
            "Ask your Tollgate administrator to add it.",
            param="model",
        )
    return model


def content_digest(parsed: ParsedBody) -> bytes:
    """SHA-256 of a request's parsed fields, its JSON image references and its uploads'
    bytes: the same however its body was framed (a new boundary, its parts of different
    names in another order; the order of the images sent under one name counts)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(parsed.fields, sort_keys=True).encode())
    digest.update(json.dumps(parsed.references, sort_keys=True).encode())
    for upload in sorted(parsed.uploads, key=lambda upload: upload.name):
        digest.update(f"\0{upload.name}\0{upload.format}\0{len(upload.data)}\0".encode())
        digest.update(upload.data)
    return digest.digest()
