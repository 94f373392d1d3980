"""A team's files past a run of other files longer than a listing reads (2,100), through
the official SDK's auto-pagination against the running proxy and simulator: every one of
the team's files once, in the upstream's order (`proxy.web.files.jump`)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.web.files import SKIPPED_PAGES, UPSTREAM_PAGE
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    run_tollgate,
    write_config,
)


@pytest.fixture(scope="module")
def proxy(upstream: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("jump")
    write_config(root, f"{upstream.url}/v1")
    yield from run_tollgate(root)


def test_the_sdk_lists_every_own_file_past_a_longer_run_than_a_listing_reads(
    proxy: Tollgate, upstream: Simulator
) -> None:
    sdk = proxy.client()

    def mine() -> str:
        return sdk.files.create(file=("a.txt", io.BytesIO(b"x")), purpose="user_data").id

    made = [mine(), mine()]
    run = (SKIPPED_PAGES + 1) * UPSTREAM_PAGE + 50
    with httpx.Client(
        base_url=upstream.url, headers={"authorization": f"Bearer {UPSTREAM_KEY}"}
    ) as direct:
        for i in range(run):
            direct.post(
                "/v1/files", files={"file": (f"d{i}.txt", b"x")}, data={"purpose": "user_data"}
            ).raise_for_status()
    made.append(mine())
    assert [f.id for f in sdk.files.list(limit=2)] == list(reversed(made))
    assert [f.id for f in sdk.files.list(limit=2, order="asc")] == made
    last = sdk.files.list(limit=100, after=made[-1])
    assert [f.id for f in last.data] == list(reversed(made[:2]))
    assert last.has_more is False
