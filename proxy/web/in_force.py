"""A request is decided under the configuration in force when its reservation is written.

A request takes the runtime in force when its headers come (`proxy.web.runtime`), and a
reload may swap in another before it is decided: while its body arrives, while it waits
for the ledger's write lock, while a batch's plan is made on a thread. Admitted under the
replaced configuration, it would pass a budget lowered, or use a key revoked, by a reload
already answered. So an image or Responses request (`proxy.web.pipeline`) and a batch
create (`proxy.web.batches`) are decided in `decided`:

    for up to DECISIONS attempts:
        identify it again under the runtime in force  (401 if its key is gone)
        decide it: parse, price, allow, repeats, reserve  (the door's own steps)
        the reservation's transaction checks that runtime is still in force
            (`still_in_force`), else nothing is written and it is decided again

Only a request that reloads keep overtaking, attempt after attempt, is answered 503
`configuration_reloaded` (`Reloaded`, which the SDKs retry). A file upload or a
passthrough request, which reserves nothing, is identified again once its body is in
(`identified_again`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from proxy.core.auth import identify
from proxy.core.errors import Reloaded, Superseded
from proxy.core.models import Entry
from proxy.core.settings import Team, TeamKey
from proxy.web.runtime import Runtime

T = TypeVar("T")

DECISIONS = 3
"""How many times a request is decided while reloads land during its decision, each time
under the configuration then in force, before it is answered 503 `configuration_reloaded`."""


@dataclass(slots=True)
class Caller:
    """Whom a request is decided for, and under which runtime: its team and key as the
    configuration of `runtime` names them, its ledger row so far, and the headers its
    answer carries. Identified again under the runtime in force before each decision."""

    runtime: Runtime
    team: Team
    key: TeamKey
    entry: Entry
    headers: dict[str, str]

    def identify_again(self, request: Request) -> None:
        """Under the runtime a reload swapped in since this one was taken, if any: the team
        and key its bearer key names there, the entry identified anew (what it asked is
        read again under that configuration). AuthenticationFailed (revoked, or its team
        removed) and Superseded leave it as it was."""
        newer = identified_again(request, self.runtime)
        if newer is None:
            return
        self.runtime, self.team, self.key = newer
        self.entry = self.entry.identified(self.team.name, self.team.cost_center, self.key.id)
        self.headers["x-tollgate-team"] = self.team.name


async def decided(request: Request, caller: Caller, decide: Callable[[Caller], Awaitable[T]]) -> T:
    """What `decide(caller)` returns once it reserved under the runtime in force. A reload
    that lands before its reservation is written (`Reloaded`: nothing reserved, nothing
    forwarded) has it decided again from the start under the new runtime, the body it
    read kept, up to DECISIONS times in all; then the Reloaded is raised."""
    for _ in range(DECISIONS - 1):
        caller.identify_again(request)
        try:
            return await decide(caller)
        except Reloaded:
            continue
    caller.identify_again(request)
    return await decide(caller)


def still_in_force(runtime: Runtime) -> None:
    """Raise Reloaded unless `runtime`, under which a request was parsed and is about to be
    decided, is still in force: called in the reservation's transaction, so that no
    request is admitted under a configuration a reload replaced before it was written (a
    budget lowered, a key revoked, a reload already answered)."""
    if runtime.newest() is not runtime:
        raise Reloaded(
            "Tollgate's configuration was reloaded while this request was decided, again "
            f"on each of {DECISIONS} attempts; retry (it is decided under the new one)."
        )


def identified_again(request: Request, runtime: Runtime) -> tuple[Runtime, Team, TeamKey] | None:
    """Once a request's body is in: None while `runtime`, which it took when its headers
    came, is still in force; else the runtime a reload swapped in meanwhile, and the team
    and key its bearer key names there (AuthenticationFailed when none does: revoked, or
    its team removed). A body may take `limits.body_timeout_s` to arrive: admitted under
    the configuration its headers found, a request went upstream with a key refused
    everywhere else, or past a budget cut meanwhile, that long after the reload.

    A worker that a reload replaced (`--workers N`) reads the files again then, and takes
    their runtime as a single worker does (`proxy.web.reload.Reloader.replaced`); one that
    could not read them is `superseded`, and a request that reaches this point there is
    refused (Superseded: 503, which the SDKs retry on a new connection, and a new worker
    takes), never admitted under the configuration the reload replaced."""
    newest = runtime.newest()
    if newest.superseded:
        raise Superseded(
            "Tollgate's configuration was reloaded while this request arrived, and the "
            "process that received it could not read the new one; retry (a new connection "
            "reaches a process under the new configuration)."
        )
    if newest is runtime:
        return None
    team, key = identify(request.headers.get("authorization"), newest.config.team_by_key_hash())
    return newest, team, key
