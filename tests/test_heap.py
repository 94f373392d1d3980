"""A serving process sets its start-up heap aside from the garbage collector, and what a
reload replaces is freed without it (a frozen object in a garbage cycle would never be)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from proxy.config import load_config
from proxy.core.settings import Config
from proxy.web.app import create_app
from proxy.web.runtime import Overrides, Runtime
from tests.conftest import UPSTREAM_KEY, write_config

ADMIN = {"authorization": "Bearer admin-secret-for-tests"}


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    write_config(tmp_path, "http://simulated/v1", settings="admin_token: admin-secret-for-tests\n")
    return tmp_path


@pytest.fixture
def thawed() -> Iterator[None]:
    """The test process's heap as it was: nothing frozen before, nothing left frozen."""
    assert gc.get_freeze_count() == 0
    try:
        yield
    finally:
        gc.unfreeze()


def tracked(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def test_a_serving_app_freezes_its_start_up_heap(policies: Path, thawed: None) -> None:
    app = create_app(
        load_config(policies), Overrides(upstream_key=UPSTREAM_KEY), policies, settle_heap=True
    )
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 1000  # modules, configuration, the runtime
        assert tracked(Runtime) == 0  # out of the collector's sight
        assert client.get("/healthz").status_code == 200


def test_an_app_in_a_test_leaves_the_heap_alone(policies: Path, thawed: None) -> None:
    app = create_app(load_config(policies), Overrides(upstream_key=UPSTREAM_KEY), policies)
    with TestClient(app):
        assert gc.get_freeze_count() == 0


def test_what_a_reload_replaces_is_freed_without_the_collector(
    policies: Path, thawed: None
) -> None:
    app = create_app(load_config(policies), Overrides(upstream_key=UPSTREAM_KEY), policies)
    with TestClient(app) as client:
        assert client.post("/admin/reload", headers=ADMIN).status_code == 200
        gc.collect()
        gc.disable()
        try:
            runtimes, configs = tracked(Runtime), tracked(Config)
            for _ in range(3):
                assert client.post("/admin/reload", headers=ADMIN).status_code == 200
            # Each reload's predecessor went by reference counting, not in a cycle. The
            # app's thread may still be unwinding the last request (its frames hold the
            # runtime it served) when the answer reaches this one: wait for it, with the
            # collector still off, so that an object in a cycle is never freed meanwhile.
            # (The count taken before may hold one the app's thread had not yet let go.)
            deadline = time.monotonic() + 10
            while tracked(Runtime) > runtimes or tracked(Config) > configs:
                assert time.monotonic() < deadline, (tracked(Runtime), tracked(Config))
                time.sleep(0.01)
        finally:
            gc.enable()
