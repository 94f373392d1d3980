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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from proxy.config import environment, load_config
from proxy.core.errors import ConfigError
from proxy.core.settings import Config
from proxy.ledger import open_ledger
from proxy.logs import configure_logging
from proxy.web.app import create_app
from proxy.web.connections import ServerConfig, concrete_port
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
REPLACED = signal.SIGUSR2
"""What the supervisor sends the workers a reload replaced, just before it stops them: each
reads the files again, and decides the requests it still takes under them, as the workers
that replaced it do (`proxy.web.reload.Reloader.replaced`)."""
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
    return Prepared(replace(options, port=concrete_port(options.host, options.port)), config, app)


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

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.retiring: list[Process] = []
        """Workers replaced at a reload, finishing their requests in flight."""

    def restart_all(self) -> None:
        """Replace every worker (SIGHUP: a reload): start a new worker for each, and once
        every one serves, stop the old ones together, telling them first that they were
        replaced (`REPLACED`); if one does not start, stop the new ones and keep the old
        ones, telling them (SIGUSR1: a reload waiting says so).

        uvicorn replaced them one at a time, waiting for each old worker to finish its
        requests in flight (up to `upstream.total_timeout_s`) before replacing the next:
        meanwhile the others served the old configuration (a key revoked, a budget
        lowered), and a new worker that did not start left the workers under two. The old
        workers are not waited for here: they end as any stopping worker does, and are
        reaped as they exit, so that the next reload is not held up by them either."""
        fresh: list[Process] = []
        for _ in self.processes:
            process = Process(self.config, self.sockets)
            process.start()
            fresh.append(process)
        for process in fresh:
            if not process.wait_until_ready(
                self.config.timeout_worker_healthcheck, self.should_exit
            ):
                for started in fresh:
                    started.kill()
                    started.join()
                if not self.should_exit.is_set():
                    kept = [old.pid for old in self.processes]
                    log.error(
                        "New worker [%s] was not ready in time; keeping workers %s and "
                        "aborting the restart.",
                        process.pid,
                        kept,
                    )
                    for pid in kept:
                        if pid is not None:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGUSR1)
                return
        old, self.processes = self.processes, fresh
        for process in old:
            # Told first that they were replaced: a request whose body (or decision) comes
            # after this is decided there under the files read again, or refused, never
            # admitted under the configuration replaced.
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, REPLACED)
            process.terminate()
        self.retiring.extend(old)

    def keep_subprocess_alive(self) -> None:
        for process in list(self.retiring):
            if not process.process.is_alive():
                process.join()
                self.retiring.remove(process)
        super().keep_subprocess_alive()

    def join_all(self) -> None:
        super().join_all()
        for process in self.retiring:
            process.join()

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
        timeout_graceful_shutdown=graceful_s(prepared.config),
        timeout_worker_healthcheck=WORKER_START_S,
        log_config=None,
        **extra,
    )


def graceful_s(config: Config) -> int:
    """How long a stopping server (SIGTERM, or a worker a reload replaced) lets its
    connections finish before uvicorn cancels what is left (a plain 500 to its client).

    A connection idle when it stops may still bring a request, its headers in within
    `limits.header_timeout_s`; that request may last its deadline (`upstream.deadline_s`),
    and its answer take `SHUTDOWN_MARGIN_S` more to go out. uvicorn's timeout counts from
    the stop, over the wait for connections and the tasks after it."""
    return int(config.limits.header_timeout_s + config.upstream.deadline_s + SHUTDOWN_MARGIN_S)


def worker_app(options: ServeOptions) -> Gateway:
    """The app of one worker process: its own logging, the configuration read afresh, and
    a reload that has the supervisor replace every worker (`Replacement`)."""
    configure_logging(options.log_level)  # each worker logs its own requests
    if options.supervisor is not None:
        stop_with(options.supervisor)
    config = load_config(options.config_path)
    if options.ledger_url is not None:
        same_ledger(config, options.overrides, options.ledger_url)
    replacement = Replacement(options.supervisor, options.config_path)
    gateway = create_app(
        config,
        options.overrides,
        options.config_path,
        metrics_dir=options.metrics_dir,
        replace_workers=replacement,
        settle_heap=True,
    )
    replacement.listen(gateway.on_replaced)
    return gateway


REPLACED_WITHIN_S = WORKER_START_S + 30
"""How long a reload waits for the supervisor to bring the new workers into service (they
start together, and each has `WORKER_START_S`) before it answers that they did not."""
REPLACEMENT_POLL_S = 0.05
STOPS_ACCEPTING_S = 0.5
"""How long after being told to stop the old workers may still accept a connection:
uvicorn looks at its stop flag every 0.1 s, then closes its listener. A reload answers only
after it, or a client's next connection could still reach an old worker and its old
configuration."""


class Replacement:
    """How a worker's reload has the supervisor replace every worker, and learns the outcome.

    The supervisor (`Supervisor.restart_all`) starts a new worker for every one in force,
    each reading the files, and once all of them serve, stops the old ones together: this
    worker being told to stop (SIGTERM, still handled as uvicorn handles it) is the sign
    that every worker now serves the new files. Just before, the supervisor tells it that it
    was replaced (`REPLACED`): it reads the files again, and what it still decides (a body
    that came late, the next request on a connection kept alive, answered with
    `Connection: close`, see `proxy.web.connections`) is decided under them
    (`proxy.web.reload.Reloader.replaced`). A new worker that does not start makes the
    supervisor keep the workers in force and tell them so (SIGUSR1)."""

    def __init__(self, supervisor: int | None, source: Path) -> None:
        self.supervisor = supervisor
        self.source = source
        self.stopping = False
        self.refusals = 0

    def listen(self, replaced: Callable[[], None]) -> None:
        """Take note of SIGTERM and SIGUSR1, and call `replaced` on `REPLACED`. Called in the
        worker's main thread while uvicorn serves (it makes the app then), SIGTERM being
        uvicorn's to act on."""
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return  # not under uvicorn's signal handling: a reload will say it got no answer

        def stopping(sig: int, frame: Any) -> None:
            self.stopping = True
            previous(sig, frame)

        def refused(sig: int, frame: Any) -> None:
            self.refusals += 1

        def replaced_soon(sig: int, frame: Any) -> None:
            # Not in the handler itself: a Python signal handler runs between any two
            # bytecodes of the loop's thread, in the middle of the loop's own bookkeeping
            # (its timer heap) or a request's. The loop runs `replaced` once the
            # callbacks already due have run.
            loop.call_soon_threadsafe(replaced)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # made outside uvicorn's loop: no reload can replace it
            return
        signal.signal(signal.SIGTERM, stopping)
        signal.signal(signal.SIGUSR1, refused)
        signal.signal(REPLACED, replaced_soon)

    async def __call__(self) -> None:
        """Ask the supervisor, this worker's parent, to replace every worker; return once
        they all serve, or raise a ConfigError. Not once the supervisor is gone: the parent
        then is whatever adopted this worker (init), and this worker is stopping anyway."""
        parent = os.getppid()
        if self.supervisor is not None and parent != self.supervisor:
            raise ConfigError([f"{self.source}: the supervisor is gone; this worker stops"])
        refusals = self.refusals
        os.kill(parent, signal.SIGHUP)
        deadline = time.monotonic() + REPLACED_WITHIN_S
        while not self.stopping:
            if self.refusals != refusals or time.monotonic() > deadline:
                raise ConfigError(
                    [
                        f"{self.source}: a new worker reading these files did not start (the "
                        "server's log says why): every worker keeps the configuration in force"
                    ]
                )
            await asyncio.sleep(REPLACEMENT_POLL_S)
        await asyncio.sleep(STOPS_ACCEPTING_S)


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

    @property
    def timeout_graceful_shutdown(self) -> int | None:
        """`graceful_s` of the configuration the app serves now, read when the server stops:
        a reload may change the deadlines, and the workers it starts are given the settings
        the server started with. Until the app serves, the value it was made with."""
        runtime = getattr(getattr(self, "loaded_app", None), "runtime", None)
        if runtime is not None:
            return graceful_s(runtime.config)
        # Settings pickled by an older Tollgate (upgraded in place, then reloaded) hold the
        # value itself: without it, the worker failed at its stop, cutting what it served.
        started: int | None = self.__dict__.get(
            "started_graceful_s", self.__dict__.get("timeout_graceful_shutdown")
        )
        return started

    @timeout_graceful_shutdown.setter
    def timeout_graceful_shutdown(self, value: int | None) -> None:
        self.started_graceful_s = value


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
            # uvicorn's own logging configuration would give its loggers text handlers,
            # the proxy's included: every line stays the JSON of `configure_logging`.
            log_config=None,
        )
    )
    threading.Thread(target=server.run, name="simulated-upstream", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return port
