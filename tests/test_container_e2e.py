"""The Docker image, built from the Dockerfile and run by a real Docker engine.

Marked `container` (`pytest -m container` runs only these; `-m 'not container'` skips them).
The engine's containers share the host's network (`--network host`), so everything stays on
127.0.0.1. No image registry is needed: unless $TOLLGATE_TEST_DOCKER_BASE names a base image
(e.g. python:3.11-slim where a registry is reachable), the base is a minimal Debian bookworm
with Python, made with debootstrap from the machine's Debian mirror and cached by its tag
between runs. Without an engine these tests skip on a workstation and fail in CI ($CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_TEAMS, DESIGN_KEY, UPSTREAM_KEY, free_port, start, stop

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}
STAND_IN_BASE = "tollgate-test-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The demo key of policies/teams/design.yaml, which the image carries as its example policies.
DEMO_DESIGN_KEY = "tg_demo_design_0123456789abcdef"
LEDGER = "sqlite:////var/lib/tollgate/tollgate.db"
HEALTHY_WITHIN_S = 90.0


def unavailable(reason: str) -> NoReturn:
    """CI must exercise the image, so there a missing engine is a failure, not a skip."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: the container tests must run)", pytrace=False)
    pytest.skip(reason)


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """`docker ARGS`'s standard output; a failure shows its standard error."""
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        # The classic builder: `--network host` without BuildKit's entitlements, and no
        # buildx plugin needed next to Debian's docker.io.
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout.strip()


# -- the engine, the base and the image ------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None:
        unavailable("no docker command (tests/run installs Debian's docker.io)")
    try:
        version = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        version = ""
    if not version:
        unavailable("no Docker engine answers `docker info` (tests/run starts dockerd)")


def debian_mirror() -> str:
    """The machine's Debian mirror for bookworm's main archive (not -security/-updates)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if source.suffix not in {".list", ".sources"} or not source.is_file():
            continue
        text = source.read_text(errors="replace")
        if source.suffix == ".list":
            # deb [options] URI SUITE COMPONENTS...
            stanzas = [
                (m[1], [m[2]])
                for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M)
            ]
        else:
            stanzas = []
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.M))
                if "deb" in fields.get("Types", "").split():
                    stanzas += [(uri, fields.get("Suites", "").split())
                                for uri in fields.get("URIs", "").split()]  # fmt: skip
        for uri, suites in stanzas:
            if "debian" in uri and "security" not in uri and any("-" not in s for s in suites):
                return uri
    return "http://deb.debian.org/debian"


def build_stand_in_base() -> None:
    """Debian bookworm (minbase) with Python 3.11, venv and pip, and this machine's CA
    bundle so that pip inside the image build reaches PyPI through the same trust."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        unavailable(
            f"{STAND_IN_BASE} is missing and only root with debootstrap can make it "
            "(or set TOLLGATE_TEST_DOCKER_BASE=python:3.11-slim)"
        )
    root = Path(tempfile.mkdtemp(prefix="tollgate-base-", dir="/var/tmp"))
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,ca-certificates",
             "bookworm", str(root), debian_mirror()],
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        if CA_BUNDLE.is_file():
            shutil.copyfile(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-", STAND_IN_BASE],
            stdin=tar.stdout, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        assert tar.wait() == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base(engine: None) -> str:
    chosen = os.environ.get("TOLLGATE_TEST_DOCKER_BASE")
    if chosen:
        return chosen
    if not docker("image", "ls", "--quiet", STAND_IN_BASE):
        build_stand_in_base()
    return STAND_IN_BASE


@pytest.fixture(scope="module")
def image(base: str) -> Iterator[str]:
    tag = f"tollgate-test:{uuid.uuid4().hex[:12]}"
    docker("build", "--network", "host", "--build-arg", f"BASE={base}", "--tag", tag,
           str(REPO), timeout=1800)  # fmt: skip
    yield tag
    docker("image", "rm", "--force", tag, check=False)


# -- containers ------------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = DEMO_DESIGN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def exec(self, *args: str) -> str:
        return docker("exec", self.name, *args)

    def state(self, field: str) -> str:
        return docker("inspect", "--format", f"{{{{{field}}}}}", self.name)

    def wait_healthy(self) -> None:
        """Until Docker's HEALTHCHECK reports healthy (the image's own check, not ours)."""
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while time.monotonic() < deadline:
            if self.state(".State.Status") == "exited":
                raise AssertionError(f"{self.name} exited:\n{self.logs()}")
            if self.state(".State.Health.Status") == "healthy":
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not turn healthy:\n{self.logs()}")

    def logs(self) -> str:
        done = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True)
        return done.stdout + done.stderr

    def audit(self) -> list[dict[str, Any]]:
        """Every ledger row, read by the image's own `tollgate report --audit`."""
        text = self.exec("tollgate", "report", "--audit", "--ledger", LEDGER,
                         "--from", "2000-01-01", "--to", "2999-12-31")  # fmt: skip
        return [json.loads(line) for line in text.splitlines() if line.strip()]


Run = Callable[..., Container]


@pytest.fixture
def volume(engine: None) -> Iterator[str]:
    name = f"tollgate-test-ledger-{uuid.uuid4().hex[:12]}"
    yield name
    docker("volume", "rm", "--force", name, check=False)


@pytest.fixture
def run(image: str, volume: str) -> Iterator[Run]:
    """Start the image on the host network with `volume` as its ledger directory."""
    names: list[str] = []

    def run_container(*args: str, mounts: tuple[str, ...] = ()) -> Container:
        port = free_port()
        name = f"tollgate-test-{uuid.uuid4().hex[:12]}"
        names.append(name)
        options = [f"--volume={m}" for m in (f"{volume}:/var/lib/tollgate", *mounts)]
        docker("run", "--detach", "--name", name, "--network", "host", "--health-interval=1s",
               *options, image, "serve", "--host", "127.0.0.1", "--port", str(port),
               "--ledger", LEDGER, *args)  # fmt: skip
        container = Container(name, port)
        container.wait_healthy()
        return container

    yield run_container
    for name in names:
        docker("rm", "--force", "--volumes", name, check=False)


# -- the tests -------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user_and_its_healthcheck_turns_healthy(run: Run) -> None:
    container = run("--simulate")
    assert container.exec("id", "-u") != "0"
    # The server itself (PID 1, what `docker stop` signals), not only `docker exec`.
    status = container.exec("cat", "/proc/1/status")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids and "0" not in uids, uids
    assert "serve" in container.exec("cat", "/proc/1/cmdline").split("\0")
    assert httpx.get(f"{container.url}/healthz").json() == {"status": "ok"}


def test_the_openai_sdk_gets_an_image_and_the_ledger_volume_outlives_the_container(
    run: Run,
) -> None:
    first = run("--simulate")
    raw = first.client().images.with_raw_response.generate(
        model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
    )
    answer = raw.parse()
    assert answer.data and answer.data[0].b64_json and answer.usage is not None
    upstream_id = raw.headers["x-request-id"]

    docker("restart", first.name, timeout=90)
    first.wait_healthy()
    row = next(r for r in first.audit() if r["upstream_request_id"] == upstream_id)
    assert row["state"] == "settled" and row["team"] == "design" and row["cost_nanos"] > 0

    # A new container on the same volume: the spend is still counted against the budget.
    docker("rm", "--force", first.name)
    second = run("--simulate")
    assert any(r["upstream_request_id"] == upstream_id for r in second.audit())
    budgets = json.loads(second.exec("tollgate", "budgets", "--ledger", LEDGER, "--format", "json"))
    design_month = next(
        b for b in budgets["budgets"]
        if b["team"] == "design" and b["period"] == "month" and b["metric"] == "usd"
    )  # fmt: skip
    assert float(design_month["spent"]) > 0, design_month


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    """The simulated OpenAI on the host, answering each image after 5 s."""
    port = free_port()
    process = start(
        ["simulate-upstream", "--port", str(port), "--api-key", UPSTREAM_KEY,
         "--latency-ms", "5000"],
        f"http://127.0.0.1:{port}/healthz",
    )  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    stop(process)


def mounted_policies(directory: Path, upstream: str) -> str:
    """A policies directory the container's user can read, as a read-only mount."""
    (directory / "teams").mkdir(parents=True)
    (directory / "tollgate.yaml").write_text(
        textwrap.dedent(f"""
        upstream:
          base_url: {upstream}/v1
          api_key: {UPSTREAM_KEY}
          timeout_s: 30
        default_model: gpt-image-2
    """)
    )
    for name, text in DEFAULT_TEAMS.items():
        (directory / "teams" / f"{name}.yaml").write_text(textwrap.dedent(text))
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return f"{directory}:/etc/tollgate:ro"


def test_docker_stop_lets_the_request_in_flight_finish_and_settle(
    run: Run, slow_upstream: str, tmp_path: Path
) -> None:
    container = run(mounts=(mounted_policies(tmp_path / "policies", slow_upstream),))
    results: list[object] = []

    def call() -> None:
        try:
            results.append(container.client(DESIGN_KEY).images.with_raw_response.generate(
                model="gpt-image-2", prompt="slow", quality="low", size="1024x1024"
            ))  # fmt: skip
        except openai.APIError as exc:
            results.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    # Once the upstream has the request, Tollgate has reserved it and waits for the answer.
    deadline = time.monotonic() + 30
    while not httpx.get(f"{slow_upstream}/_sim/billing").json()["requests"]:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.02)
    assert caller.is_alive(), "the answer came before the stop: nothing was in flight"
    docker("stop", "--time", "60", container.name, timeout=90)  # SIGTERM, then waits
    caller.join(timeout=30)
    assert container.state(".State.ExitCode") == "0", container.logs()

    assert len(results) == 1 and not isinstance(results[0], Exception), results
    upstream_id = results[0].headers["x-request-id"]  # type: ignore[attr-defined]
    docker("start", container.name)
    container.wait_healthy()
    row = next(r for r in container.audit() if r["upstream_request_id"] == upstream_id)
    assert row["state"] == "settled" and row["outcome"] == "ok" and row["cost_nanos"] > 0, row
