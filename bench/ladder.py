"""The downgrade ladder: CPU of one `budgets.decide`, in process (not a test).

    .venv/bin/python -m bench.ladder [--rounds 200]

`decide` runs inside the ledger's reservation transaction (the shared write lock), so
its CPU holds every team's reservations. Timed for a 2048x2048 gpt-image-2 request at
`auto` quality under `order: [quality, size, model]` with gpt-image-1-mini as the
fallback model, against a daily USD budget of the team:

- refused: the budget has $0.001 left, no form of the request fits (a 429);
- as asked: the budget has room for the request itself;
- downgraded: room for low quality at the same size only (found after three steps).

Prints the `priced` calls of each (variants whose bound was computed) and CPU
microseconds per `decide` (the best of `--rounds`, `time.process_time`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from proxy.config.prices import load_price_book
from proxy.core import budgets
from proxy.core.budgets import Variant, decide
from proxy.core.errors import BudgetExceeded
from proxy.core.models import Counter, ImageRequest, Totals
from proxy.core.periods import Applied, applicable
from proxy.core.pricing import estimate
from proxy.core.settings import Allow, Budget, Config, Downgrade, Team, UpstreamSettings

NOW = 1_780_000_000.0
LIMIT = 100 * 10**9


def team() -> Team:
    return Team(
        name="design",
        cost_center=None,
        keys=(),
        budgets=(Budget("day", "usd", LIMIT),),
        per_user=(),
        allow=Allow(),
        throttle=(),
        on_exhausted="downgrade",
        downgrade=Downgrade(("quality", "size", "model"), "gpt-image-1-mini"),
    )


def best_us(run: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.process_time()
        run()
        times.append(time.process_time() - began)
    return min(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    book = load_price_book()
    the_team = team()
    config = Config(
        root=Path("."),
        upstream=UpstreamSettings(),
        ledger_url="sqlite:///:memory:",
        timezone="UTC",
        admin_token=None,
        prices=book,
        organization_budgets=(),
        teams=(the_team,),
    )
    applied: tuple[Applied, ...] = applicable(config, the_team, None, NOW)
    counter: Counter = applied[0].counter
    model = book.find("gpt-image-2")
    assert model is not None
    request = ImageRequest(
        endpoint="generations", model="gpt-image-2", quality="auto", size="2048x2048"
    )
    start = Variant(request, model, estimate(model, request))
    low = estimate(model, request.with_changes(quality="low")).cost_nanos
    cases = {
        "refused": LIMIT - 10**6,
        "as asked": 0,
        "downgraded": LIMIT - low,
    }
    calls = 0
    real = budgets.priced

    def counted(*a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        return real(*a, **k)  # type: ignore[arg-type]

    print("2048x2048 gpt-image-2, auto quality, order [quality, size, model], fallback")
    print("gpt-image-1-mini, one daily USD budget")
    for name, used in cases.items():
        totals = {counter: Totals(spent_nanos=used)}

        def run(totals: dict[Counter, Totals] = totals) -> None:
            with contextlib.suppress(BudgetExceeded):
                decide(the_team, start, applied, totals, book)

        budgets.priced = counted  # type: ignore[assignment]
        calls = 0
        run()
        budgets.priced = real
        micros = best_us(run, args.rounds)
        print(f"{name:<12} {calls:4d} variants priced  {micros:8.1f} µs per decide")


if __name__ == "__main__":
    main()
