"""Serving: the serve options reach every worker process, as an argument."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from proxy.cli.server import print_banner
from proxy.config import load_config
from proxy.web.app import create_app
from proxy.web.runtime import Overrides
from proxy.web.server import Prepared, ServeOptions, worker_app, workers_config
from tests.conftest import (
    DESIGN_KEY,
    UPSTREAM_KEY,
    free_port,
    output,
    start,
    stop,
    wait_for,
    wait_until_up,
    workers_of,
    write_config,
)

UNREACHABLE = "http://127.0.0.1:9/v1"


def test_the_options_travel_to_the_workers_with_uvicorns_settings(tmp_path: Path) -> None:
    write_config(tmp_path, UNREACHABLE)
    options = ServeOptions(
        tmp_path,
        workers=3,
        log_level="warning",
        overrides=Overrides(
            ledger_url="sqlite:///elsewhere.db",
            upstream_url="http://127.0.0.1:8090/v1",
            upstream_key=UPSTREAM_KEY,
        ),
        metrics_dir=tmp_path / "metrics",
    )
    config = load_config(tmp_path)
    prepared = Prepared(options, config, create_app(config, options.overrides))
    # uvicorn pickles its settings into each worker process it spawns.
    settings = pickle.loads(pickle.dumps(workers_config(prepared)))
    assert settings.factory and settings.workers == 3
    assert settings.app.func is worker_app
    assert settings.app.args == (options,)


def test_a_stopping_worker_gives_its_last_request_its_deadline(tmp_path: Path) -> None:
    """uvicorn cancels what is left of a stopping server's requests (a plain 500) after its
    graceful-shutdown timeout, counted from the stop. It was the upstream deadline + 5 s, as
    configured when the server started: a request that came on a connection idle at the
    stop (up to the header deadline later) was cut before its deadline, and a reload that
    lengthened the deadline left the new workers, and the old ones, the old timeout."""
    write_config(tmp_path, UNREACHABLE)  # timeout_s: 3, so a 6 s deadline; 10 s for headers
    options = ServeOptions(tmp_path, workers=2)
    config = load_config(tmp_path)
    prepared = Prepared(options, config, create_app(config, options.overrides))
    settings = pickle.loads(pickle.dumps(workers_config(prepared)))
    assert settings.timeout_graceful_shutdown == 10 + 6 + 5
    settings.load()
    assert settings.timeout_graceful_shutdown == 10 + 6 + 5  # not serving yet
    settings_file = tmp_path / "tollgate.yaml"
    settings_file.write_text(settings_file.read_text().replace("timeout_s: 3", "timeout_s: 30"))
    reloaded = load_config(tmp_path)
    settings.loaded_app.runtime = SimpleNamespace(config=reloaded)  # the runtime in force
    assert settings.timeout_graceful_shutdown == 10 + 60 + 5
    # Settings pickled by a Tollgate before this one (upgraded in place, then reloaded).
    older = pickle.loads(pickle.dumps(workers_config(prepared)))
    older.__dict__["timeout_graceful_shutdown"] = older.__dict__.pop("started_graceful_s")
    assert older.timeout_graceful_shutdown == 10 + 6 + 5


def test_workers_serve_with_the_options_of_the_command_line(tmp_path: Path) -> None:
    """The configuration names an upstream that does not answer and another ledger: the
    answer and its row show that both workers took `--simulate` and `--ledger`."""
    write_config(tmp_path, UNREACHABLE)
    elsewhere = tmp_path / "elsewhere.db"
    port = free_port()
    process = start(
        ["serve", "--config", str(tmp_path), "--port", str(port), "--workers", "2",
         "--simulate", "--ledger", f"sqlite:///{elsewhere}"],
        f"http://127.0.0.1:{port}/healthz",
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=DESIGN_KEY)
        for i in range(4):  # new connections: the kernel spreads them over the workers
            answer = client.with_options(max_retries=0).images.generate(
                model="gpt-image-2", prompt=f"p {i}", quality="low", size="1024x1024"
            )
            assert answer.data
    finally:
        stop(process)
    with sqlite3.connect(elsewhere) as db:
        assert db.execute("SELECT count(*) FROM requests").fetchone() == (4,)
    assert not (tmp_path / "tollgate.db").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_simulate_logs_every_line_as_json(tmp_path: Path, workers: str) -> None:
    """Past the banner (on stdout), each line is one JSON object: uvicorn's, the
    refusal of a key's, a request's. The simulated upstream, started in the process,
    leaves the proxy's logging as it is."""
    write_config(tmp_path, UNREACHABLE)
    port = free_port()
    process = start(
        ["serve", "--config", str(tmp_path), "--port", str(port), "--workers", workers,
         "--simulate"],
        f"http://127.0.0.1:{port}/healthz",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        refused = openai.OpenAI(base_url=url, api_key="tg_unknown_key_0123456789")
        with pytest.raises(openai.AuthenticationError):
            refused.with_options(max_retries=0).images.generate(prompt="p", quality="low")
        client = openai.OpenAI(base_url=url, api_key=DESIGN_KEY, max_retries=0)
        assert client.images.generate(prompt="p", quality="low", size="1024x1024").data
    finally:
        log = stop(process)
    lines = log.splitlines()
    assert lines[0].startswith("Tollgate ") and "OPENAI_BASE_URL" in lines[2]
    logged = [json.loads(line) for line in lines[3:]]
    assert any(line.get("logger") == "uvicorn.error" for line in logged)
    assert any("for their key" in line.get("message", "") for line in logged)
    assert any(line.get("team") == "design" for line in logged)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_port_0_prints_the_url_of_the_port_it_serves(tmp_path: Path, workers: str) -> None:
    """`--port 0` takes a free port; the banner's URL is one a client can call."""
    write_config(tmp_path, UNREACHABLE)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path), "--port", "0",
             "--workers", workers, "--simulate"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        found = wait_for(
            "the banner", lambda: re.search(r"on (http://127\.0\.0\.1:(\d+)/v1)", log.read_text())
        )
        url, port = found[1], int(found[2])
        assert port != 0 and f"OPENAI_BASE_URL={url} " in log.read_text()
        wait_until_up(url.removesuffix("/v1") + "/healthz", process)
        client = openai.OpenAI(base_url=url, api_key=DESIGN_KEY, max_retries=0)
        assert client.images.generate(prompt="p", quality="low", size="1024x1024").data
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_simulate_upstream_on_port_0_prints_the_url_of_the_port_it_serves(
    tmp_path: Path,
) -> None:
    log = tmp_path / "simulator.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "simulate-upstream", "--port", "0"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        found = wait_for(
            "the banner", lambda: re.search(r"on (http://127\.0\.0\.1:(\d+)/v1)", log.read_text())
        )
        assert int(found[2]) != 0
        models = wait_for("the simulator", lambda: answered(f"{found[1]}/models"))
        assert models.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)


def answered(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, headers={"authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=5)
    except httpx.TransportError:
        return None


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers: they stop themselves, as
    SIGTERM stops them, rather than go on serving its port unsupervised."""
    write_config(tmp_path, UNREACHABLE)
    port = free_port()
    process = start(
        ["serve", "--config", str(tmp_path), "--port", str(port), "--workers", "2", "--simulate"],
        f"http://127.0.0.1:{port}/healthz",
    )
    workers = workers_of(process.pid)
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), output(process)
    with socket.socket() as probe:  # nobody serves the port any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert output(process).count(f"the supervisor (pid {process.pid}) is gone") == 2


def alive(pid: int) -> bool:
    """`pid` is a process that has not ended (a zombie has: init reaps it soon)."""
    try:
        os.kill(pid, 0)
        status = Path(f"/proc/{pid}/status").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return "\nState:\tZ" not in status


def test_the_start_up_banner_never_prints_a_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The banner goes to the server's log: a PostgreSQL ledger's URL (or an upstream's)
    holding a password is printed with the password masked."""
    write_config(tmp_path, UNREACHABLE)
    for ledger in (
        "postgresql://tollgate:pg-s3cret@db:5432/tollgate?sslmode=require",
        "postgresql://db/tollgate?user=tollgate&password=pg-s3cret",
    ):
        options = ServeOptions(
            tmp_path,
            overrides=Overrides(
                ledger_url=ledger,
                upstream_url="https://egress:proxy-s3cret@proxy.internal/v1",
                upstream_key=UPSTREAM_KEY,
            ),
        )
        config = load_config(tmp_path)
        print_banner(Prepared(options, config, create_app(config, options.overrides)), False)
        shown = capsys.readouterr().out
        assert "s3cret" not in shown
        assert "ledger postgresql://" in shown and "db" in shown and "***" in shown
        assert "upstream https://egress:***@proxy.internal/v1" in shown


def test_the_start_up_banner_prints_an_sqlite_ledger_url_as_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The banner's SQLite URL can be passed back to `--ledger`: an absolute path keeps its
    four slashes (rebuilt by urllib it read `sqlite://tmp/...`, a relative path)."""
    write_config(tmp_path, UNREACHABLE)
    config = load_config(tmp_path)
    for given in (None, f"sqlite:///{tmp_path}/other.db"):
        options = ServeOptions(
            tmp_path, overrides=Overrides(ledger_url=given, upstream_key=UPSTREAM_KEY)
        )
        print_banner(Prepared(options, config, create_app(config, options.overrides)), False)
        shown = capsys.readouterr().out
        name = "other.db" if given else "tollgate.db"
        assert f"ledger sqlite:///{tmp_path}/{name}" in shown, shown


def test_the_start_up_banner_writes_an_ipv6_host_in_brackets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--host ::1`: the URL printed is one a client can be given, `http://[::1]:8080/v1`."""
    write_config(tmp_path, UNREACHABLE)
    config = load_config(tmp_path)
    options = ServeOptions(tmp_path, host="::1", overrides=Overrides(upstream_key=UPSTREAM_KEY))
    print_banner(Prepared(options, config, create_app(config, options.overrides)), False)
    shown = capsys.readouterr().out
    assert "on http://[::1]:8080/v1," in shown and "OPENAI_BASE_URL=http://[::1]:8080/v1 " in shown


def test_serve_warns_of_a_descriptor_limit_too_low_for_its_connections(tmp_path: Path) -> None:
    """With `ulimit -n 64`, a burst of connections took every descriptor: asyncio logged
    `socket.accept() out of system resource` hundreds of times and clients saw their
    connections fail. Start-up says so, naming the limit and what is needed."""
    write_config(tmp_path, UNREACHABLE)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path),
             "--port", str(port), "--simulate"],
            stdout=sink, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "descriptor limit" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "the descriptor limit (ulimit -n) is 64, below the 114" in log.read_text()
