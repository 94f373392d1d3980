"""What the ledger keeps for the repeats of a request (README, "Retries never pay twice"):
its first attempt as its row says now, and the answer kept for its repeats."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.core.errors import RepeatArrived


@dataclass(frozen=True, slots=True)
class FirstAttempt:
    """The earlier request a repeat repeats, as its row says now."""

    request_id: str
    started_at: float
    settled: bool
    """False while it is in flight (reserved)."""
    outcome: str | None
    status: int | None
    cost_nanos: int
    content_digest: str | None
    """Its content digest (an Idempotency-Key reused with another content is a conflict)."""
    owner: str | None = None
    """The process that holds it while it is in flight."""
    held: bool = False
    """A background response or a batch held in flight (`Ledger.hold`): its create was
    answered."""
    made: str | None = None
    """The id of what OpenAI made of it, once known: a background response's, a batch's."""
    age_s: float | None = None
    """Seconds since it was reserved, on the ledger's clock, when it was read: never another
    replica's wall clock (`started_at`) against this one's. None for a row reserved before
    the ledger recorded its clock (schema version 16)."""


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    """An answer kept for the repeats of its request: status, headers and body as the
    client got them (a stream: its events, in order)."""

    request_id: str
    team: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool
    kept_at: float
    live: bool = False
    """A stream still kept as it goes: its events so far are its chunks
    (`Ledger.append_chunk`), until `Ledger.end_stream`."""


@dataclass(frozen=True, slots=True)
class KeptTail:
    """What a repeat following a live stream reads next (`Ledger.kept_tail`)."""

    answer: KeptAnswer
    """The kept answer, its body the chunks read (joined)."""
    seq: int
    """The last chunk read (the one it was read after when there is none)."""


@dataclass(frozen=True, slots=True)
class RepeatGuard:
    """What a repeat's reservation checks in its own transaction (`Ledger.reserve`): that
    the latest attempt of its request is still `past`, the one it looked at before deciding
    to be forwarded (None: it found none). Any other (an attempt that reserved meanwhile,
    on another worker or replica) raises RepeatArrived: two attempts of one request are
    never both forwarded."""

    team: str
    since: float
    """The start of the retry window."""
    content: str
    """The repeat's content digest, looked up when it has no key."""
    key: str | None
    """The digest of its `Idempotency-Key`, looked up when it has one."""
    past: str | None
    """The request id of the attempt it went past, if any."""

    def params(self) -> tuple[str, str, float]:
        """The parameters of the lookup of the latest attempt: `first_by_key` when the
        repeat has a key, else `first_by_content`."""
        return self.team, self.key if self.key is not None else self.content, self.since

    def arrived(self, latest: str | None) -> None:
        """RepeatArrived when `latest`, the latest attempt's request id, is not `past`."""
        if latest is not None and latest != self.past:
            raise RepeatArrived(f"attempt {latest} of this request reserved first")
