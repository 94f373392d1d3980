"""Serving Tollgate: in this process, or under uvicorn's supervisor with several workers.

    run(ServeOptions(Path("policies"), port=8080, workers=4))

The options reach each worker process as the argument of its app factory
(`functools.partial(worker_app, options)`), pickled with uvicorn's settings when the
supervisor starts the worker. Only the directory of the workers' metric files goes through
the environment (`proxy.config.environment`), as prometheus-client requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from proxy.config import environment, load_config
from proxy.core.settings import Config
from proxy.ledger import open_ledger
from proxy.logs import configure_logging
from proxy.web.app import create_app
from proxy.web.connections import ServerConfig
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides, same_ledger

log = logging.getLogger("tollgate")

# asyncio's event loop, not uvloop: measured again with the aiohttp upstream client, uvloop
# used no less CPU per request (1.1-1.5 ms against 0.8-1.3) and more memory with 2,000 slow
# 2 MB answers in flight (165 MiB against 148; bench.overhead, bench.inflight).
# uvicorn's HTTP parser is httptools where installed (a dependency).
LOOP = "asyncio"
# A client may be reading a stream until its deadline: let it, then this long to answer.
SHUTDOWN_MARGIN_S = 5
SIMULATED_KEY = "sk-simulated-upstream"
SUPERVISOR_CHECK_S = 0.5
"""How often a worker checks that its supervisor is alive (as often as uvicorn's supervisor
checks its workers)."""
WORKER_START_S = 60
"""How long the supervisor waits for a worker to answer it: one starting (importing,
opening the ledger, waiting for its write lock) until it serves, and one serving, whose
answers come from a thread of their own. uvicorn's 5 s is less than a worker takes to
start on a busy machine: the supervisor then killed a worker starting with the server as
hung, and at a reload killed each new worker and kept the old ones, under the old
configuration, beside the worker that took the reload under the new one."""


@dataclass(frozen=True)
class ServeOptions:
    """How to serve: every value is plain, so the options pickle to worker processes."""

    config_path: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    log_level: str = "info"
    overrides: Overrides = field(default_factory=Overrides)
    """Only ledger and upstream choices: a transport or a clock does not cross processes."""
    metrics_dir: Path | None = None
    """Where the workers keep their metric values (set by `serve` for several workers)."""
    supervisor: int | None = None
    """The pid of the workers' supervisor (set by `serve` for several workers)."""
    ledger_url: str | None = None
    """The ledger the server opened at start (set by `serve` for several workers): a worker
    started by a reload whose files name another one refuses to start, and the old one
    stays, as a worker in one process refuses the reload (`proxy.web.runtime.same_ledger`)."""


@dataclass(frozen=True)
class Prepared:
    """Options whose configuration was read and checked, ready to serve."""

    options: ServeOptions
    config: Config
    app: Gateway


def with_simulated_upstream(options: ServeOptions) -> ServeOptions:
    """`options` with the built-in simulated upstream, started in this process, as the
    upstream (`tollgate serve --simulate`)."""
    port = start_simulator_thread()
    overrides = replace(
        options.overrides, upstream_url=f"http://127.0.0.1:{port}/v1", upstream_key=SIMULATED_KEY
    )
    return replace(options, overrides=overrides)


def run(options: ServeOptions) -> bool:
    """Serve until stopped; False if the server never started."""
    return serve(prepare(options))


def prepare(options: ServeOptions) -> Prepared:
    """Read the configuration, build the app and open the ledger once: a problem with any of
    them is raised here (ConfigError, LedgerError), before serving, not in a worker."""
    config = load_config(options.config_path)
    app = create_app(
        config,
        options.overrides,
        options.config_path,
        metrics_dir=options.metrics_dir or environment.metrics_dir(),
        settle_heap=True,
    )
    asyncio.run(check_ledger(options.overrides.ledger_url or config.ledger_url))
    return Prepared(options, config, app)


async def check_ledger(url: str) -> None:
    """Open and close the ledger."""
    ledger = await open_ledger(url)
    await ledger.close()


def serve(prepared: Prepared) -> bool:
    """Serve `prepared` until stopped; False if the server never started."""
    if prepared.options.workers > 1:
        serve_workers(prepared)
        return True
    server = uvicorn.Server(server_config(prepared, prepared.app))
    # uvicorn raises Ctrl-C again once it has shut down, as `uvicorn.run` expects.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return server.started


def serve_workers(prepared: Prepared) -> None:
    """What `uvicorn.run` does for several workers, with a TCP socket made explicitly."""
    # Before the workers import prometheus-client: their counters are summed from files.
    options = replace(
        prepared.options,
        metrics_dir=environment.share_metrics_dir(),
        supervisor=os.getpid(),
        ledger_url=prepared.options.overrides.ledger_url or prepared.config.ledger_url,
    )
    config = workers_config(replace(prepared, options=options))
    Supervisor(config, sockets=[config.bind_socket()]).run()


class Supervisor(Multiprocess):
    """uvicorn's supervisor of the workers, which stops listening when it stops.

    Each worker stops accepting when it stops, but the listening socket is the
    supervisor's too: uvicorn kept it open while the workers finished their requests
    in flight, so the kernel went on queueing new connections nobody would accept, and
    reset them when the supervisor exited. Closed once the workers are told to stop, it
    stops listening as the last worker stops accepting: new connections are refused."""

    def terminate_all(self) -> None:
        super().terminate_all()
        for sock in self.sockets:
            sock.close()


def workers_config(prepared: Prepared) -> ServerConfig:
    """uvicorn's settings for the workers: each makes its app with `worker_app(options)`."""
    return server_config(prepared, functools.partial(worker_app, prepared.options), factory=True)


def server_config(prepared: Prepared, app: Any, **extra: Any) -> ServerConfig:
    """uvicorn's settings for `prepared`."""
    options = prepared.options
    return TcpConfig(
        app,
        limits=prepared.config.limits,
        loop=LOOP,
        host=options.host,
        port=options.port,
        workers=options.workers,
        log_level=options.log_level,
        access_log=False,
        # Tollgate never reads the client's address: no X-Forwarded-For layer per request.
        proxy_headers=False,
        timeout_graceful_shutdown=int(prepared.config.upstream.deadline_s + SHUTDOWN_MARGIN_S),
        timeout_worker_healthcheck=WORKER_START_S,
        log_config=None,
        **extra,
    )


def worker_app(options: ServeOptions) -> Gateway:
    """The app of one worker process: its own logging, the configuration read afresh, and
    a reload that has the supervisor replace every worker."""
    configure_logging(options.log_level)  # each worker logs its own requests
    if options.supervisor is not None:
        stop_with(options.supervisor)
    config = load_config(options.config_path)
    if options.ledger_url is not None:
        same_ledger(config, options.overrides, options.ledger_url)
    return create_app(
        config,
        options.overrides,
        options.config_path,
        metrics_dir=options.metrics_dir,
        after_reload=functools.partial(replace_workers, options.supervisor),
        settle_heap=True,
    )


def replace_workers(supervisor: int | None) -> None:
    """Ask uvicorn's supervisor, this worker's parent, to replace its workers one by one:
    each new worker reads the configuration files afresh. Not once it is gone: the parent
    then is whatever adopted this worker (init), and this worker is stopping anyway."""
    parent = os.getppid()
    if supervisor is None or parent == supervisor:
        os.kill(parent, signal.SIGHUP)


def stop_with(supervisor: int) -> None:
    """Stop this worker as SIGTERM does (it stops accepting, and its requests in flight end
    and are settled) once its supervisor is gone, checked every `SUPERVISOR_CHECK_S`.

    A supervisor stopped by SIGTERM stops its workers itself; one killed (SIGKILL, the
    OOM killer) cannot, and its workers would go on serving its port unsupervised: a
    Tollgate started again would serve beside them, under an older configuration, and
    nothing would replace them at a reload. A process whose parent dies gets a new one
    (init, or a subreaper), so a changed parent pid is the sign."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(SUPERVISOR_CHECK_S)
        log.warning("the supervisor (pid %d) is gone: this worker stops", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


class TcpConfig(ServerConfig):
    """uvicorn's settings, with the workers' shared socket made as a TCP socket explicitly.

    uvicorn makes it with `socket.socket(family)`, whose protocol reads 0, so asyncio never
    sets TCP_NODELAY on the connections it accepts: Nagle's algorithm then waits for the
    client's delayed ACK, 40 ms on every keep-alive request (bench: p50 48 ms instead of 4).
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


def start_simulator_thread() -> int:
    """Run the simulated upstream on a free loopback port in a daemon thread; its port."""
    from proxy.simulator import SimulatorSettings, create_simulator_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_simulator_app(SimulatorSettings(api_key=SIMULATED_KEY)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    threading.Thread(target=server.run, name="simulated-upstream", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return port
