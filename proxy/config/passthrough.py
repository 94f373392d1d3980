"""`passthrough:`, the other /v1 paths forwarded unmetered, and the rules that keep image
spend out of them."""

from __future__ import annotations

from typing import Any

from proxy.config.source import Document, JsonPath
from proxy.core.paths import OBJECT_PATHS, TOLLGATE_PATHS, canonical, under
from proxy.core.settings import READ_ONLY, Passthrough

# Paths where OpenAI opens a session on the account of the key that calls it, for a browser
# to use against OpenAI directly: an ephemeral client secret (Realtime's client secrets and
# sessions, ChatKit's sessions) or a WebRTC call (`/v1/realtime/calls`, and the Live API's
# `/v1/live/sessions`, whose answer is the session itself). Passed through, they would hand
# a team a credential of the upstream account, and spend Tollgate never sees: every write
# under `/v1/realtime` and `/v1/live` is one.
KEY_MINTING = ("/v1/realtime", "/v1/live", "/v1/chatkit/sessions")

# Paths where OpenAI keeps objects of the account that calls it, listed, read, changed and
# deleted by id: every team would share the company key's, and Tollgate keeps none of them
# to the team that made it (as it does files, batches and responses). Passed through in any
# method, one team would list, read or delete another's uploads, containers and their
# files, vector stores, conversations, assistants and threads, fine-tuning jobs, evals,
# videos, ChatKit threads, skills (uploaded instructions and files, read back whole), the
# Agents API's agents, sessions and environments and its vaults of credentials, the Live
# API's stored sessions (`GET /v1/live/sessions/{id}/content` downloads one whole; a fork
# or an attach joins it), or custom voices and the consent recordings they are made from
# (`/v1/audio/voices`, `/v1/audio/voice_consents`: a prefix `/v1/audio` opened for speech
# and transcriptions reaches them; list those paths instead).
OBJECT_STORES = (
    "/v1/uploads", "/v1/containers", "/v1/vector_stores", "/v1/conversations",
    "/v1/assistants", "/v1/threads", "/v1/fine_tuning", "/v1/evals", "/v1/videos",
    "/v1/chatkit", "/v1/skills", "/v1/agents", "/v1/vaults", "/v1/live",
    "/v1/audio/voices", "/v1/audio/voice_consents",
)  # fmt: skip

# Paths a write to which changes the whole account for every team: the organization's
# administration (its API keys, users, projects, service accounts and rate limits; a
# project's roles, `/v1/projects/{id}/roles`), its models (a DELETE removes a fine-tuned
# model) and its webhook endpoints (a new one is sent every team's events; rotating an
# endpoint's secret answers the new signing secret, and breaks the operators' checks of
# the old). Only GET and HEAD may be passed through.
ACCOUNT_WIDE = ("/v1/organization", "/v1/projects", "/v1/models", "/v1/webhook_endpoints")


def passthrough_prefixes(
    doc: Document, entries: list[Any], problems: list[str]
) -> tuple[Passthrough, ...]:
    """The `passthrough:` prefixes; one that is not a canonical path, or that covers an
    image endpoint (images are never forwarded unmetered), is refused."""
    found: dict[str, Passthrough] = {}
    for index, raw in enumerate(entries):
        where: JsonPath = ("passthrough", index)
        if isinstance(raw, dict):
            where = (*where, "path")
            prefix = str(raw["path"])
            methods = frozenset(raw.get("methods", READ_ONLY))
        else:
            prefix, methods = str(raw), READ_ONLY
        prefix = prefix.removesuffix("/")
        if canonical(prefix.encode()) != prefix:
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} is not a plain path: no '.' or '..' segments, empty "
                "segments, '%' escapes, backslashes or spaces",
            )
        elif covers(prefix, "/v1/images"):
            _problem(problems, doc, where, f"{prefix!r} would forward image requests unmetered")
        elif covers(prefix, TOLLGATE_PATHS):
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} would forward {TOLLGATE_PATHS}, Tollgate's own paths",
            )
        elif methods - READ_ONLY and any(reaches(prefix, door) for door in KEY_MINTING):
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} with {', '.join(sorted(methods - READ_ONLY))} would let a team "
                "mint client secrets or sessions with the upstream key (Realtime, Live and "
                "ChatKit): only GET and HEAD may be passed through there",
            )
        elif store := next((kept for kept in OBJECT_STORES if reaches(prefix, kept)), None):
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} would show every team the objects OpenAI keeps under {store} for "
                "the company key, which Tollgate cannot keep to the team that made each one",
            )
        elif methods - READ_ONLY and any(reaches(prefix, path) for path in ACCOUNT_WIDE):
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} with {', '.join(sorted(methods - READ_ONLY))} would let a team "
                "change the whole account (the organization's API keys, users and projects, "
                "its webhook endpoints, or delete its fine-tuned models): only GET and HEAD "
                "may be passed through there",
            )
        elif any(covers(prefix, door) for door in OBJECT_PATHS):
            _problem(
                problems,
                doc,
                where,
                f"{prefix!r} would forward the responses, batches and files Tollgate keeps to "
                "each team (and, written to, image spend it did not price): Tollgate serves "
                "those paths itself",
            )
        elif prefix in found:
            _problem(problems, doc, where, f"{prefix!r} is listed twice")
        else:
            found[prefix] = Passthrough(prefix, methods)
    return tuple(found.values())


def _problem(problems: list[str], doc: Document, path: JsonPath, message: str) -> None:
    problems.append(doc.problem(path, message))


def covers(prefix: str, path: str) -> bool:
    """Whether passthrough of `prefix` reaches `path` or anything under it (any letter case)."""
    prefix = prefix.lower()
    return (path + "/").startswith(prefix) or under(prefix, path)


def reaches(prefix: str, path: str) -> bool:
    """Whether passthrough of `prefix` forwards `path` or anything under it, segment by
    segment as requests are matched (any letter case): `/v1/chat` does not reach
    `/v1/chatkit/sessions`."""
    prefix = prefix.lower()
    return under(path, prefix) or under(prefix, path)
