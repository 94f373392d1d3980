"""`tollgate serve` and `tollgate simulate-upstream`: the commands that serve.

Their stacks (uvicorn, starlette, aiohttp, httpx, the simulator) are imported inside
the commands, never when the command line is.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.cli.options import Commands, add_config, add_ledger_url, config_path, count, port

if TYPE_CHECKING:
    from proxy.web.server import Prepared


def add_serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the proxy")
    add_config(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8080)
    serve.add_argument("--workers", type=count, default=1)
    add_ledger_url(serve)
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="run the built-in simulated upstream in-process (no OpenAI key)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=run_serve)


def add_simulate(commands: Commands) -> None:
    simulate = commands.add_parser("simulate-upstream", help="run the simulated OpenAI image API")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=port, default=8090)
    simulate.add_argument("--latency-ms", type=int, default=0)
    simulate.add_argument(
        "--payload-bytes", type=int, default=0, help="pad each image to about this many bytes"
    )
    simulate.add_argument("--api-key", help="the only upstream key accepted (default: any)")
    simulate.add_argument(
        "--batch-delay-ms",
        type=int,
        help="how long a batch takes from validating to completed (default 1500)",
    )
    simulate.add_argument(
        "--batch-window-ms",
        type=int,
        help="the simulated completion window: a batch not finalizing by then expires "
        "(default 24 h)",
    )
    simulate.add_argument(
        "--data-residency",
        action="store_true",
        help="bill as a regional (data-residency) endpoint: models released on or after "
        "2026-03-05 at 110 %% of their rates",
    )
    simulate.set_defaults(run=run_simulate)


def run_serve(args: argparse.Namespace) -> int:
    """The server's stack (uvicorn, starlette, aiohttp, httpx) is imported here, by the one
    command that serves: importing it takes longer than `tollgate budgets` needs in all."""
    from proxy.logs import configure_logging
    from proxy.web.runtime import Overrides
    from proxy.web.server import ServeOptions, prepare, serve, with_simulated_upstream

    options = ServeOptions(
        config_path(args),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        overrides=Overrides(ledger_url=args.ledger),
    )
    if args.simulate:
        options = with_simulated_upstream(options)
    configure_logging(args.log_level)
    prepared = prepare(options)
    print_banner(prepared, simulate=args.simulate)
    warn_of_descriptors(prepared)
    return 0 if serve(prepared) else 1


def warn_of_descriptors(prepared: Prepared) -> None:
    """Say so when `ulimit -n` cannot hold the connections each process takes."""
    import resource

    from proxy.web.connections import default_max_connections, descriptors_needed

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    connections = prepared.config.limits.max_connections or default_max_connections(limit)
    need = descriptors_needed(connections, limit)
    if need is not None:
        print(
            f"tollgate: warning: the descriptor limit (ulimit -n) is {limit}, below the "
            f"{need} that {connections} connections per process need: past it connections "
            "fail instead of being answered 503; raise it (1,024 serves 307 connections)",
            file=sys.stderr,
            flush=True,
        )


def print_banner(prepared: Prepared, simulate: bool) -> None:
    from proxy.ledger import redacted  # URLs may hold a password: never printed

    options, config = prepared.options, prepared.config
    overrides = options.overrides
    url = f"http://{url_host(options.host)}:{options.port}/v1"
    upstream = redacted(overrides.upstream_url or config.upstream.base_url)
    note = " (simulated)" if simulate else ""
    print(
        f"Tollgate {__version__} on {url}, upstream {upstream}{note}, "
        f"ledger {redacted(overrides.ledger_url or config.ledger_url)}",
        flush=True,
    )
    print(
        f"Call it with any OpenAI client (pip install openai):\n"
        f"    OPENAI_BASE_URL={url} OPENAI_API_KEY=<team key> python -c "
        f"\"import openai; print(openai.OpenAI().images.generate(model='gpt-image-2', "
        f"prompt='a lighthouse', quality='low', size='1024x1024').usage)\"",
        flush=True,
    )


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets (`http://[::1]:8080/v1`)."""
    return f"[{host}]" if ":" in host else host


def run_simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.simulator import SimulatorSettings, create_simulator_app
    from proxy.web.connections import concrete_port

    batches = {
        name: value
        for name in ("batch_delay_ms", "batch_window_ms")
        if (value := getattr(args, name)) is not None
    }
    settings = SimulatorSettings(
        latency_ms=args.latency_ms,
        payload_bytes=args.payload_bytes,
        api_key=args.api_key,
        data_residency=args.data_residency,
        **batches,
    )
    port = concrete_port(args.host, args.port)
    print(f"Simulated OpenAI image API on http://{url_host(args.host)}:{port}/v1", flush=True)
    uvicorn.run(
        create_simulator_app(settings),
        host=args.host,
        port=port,
        log_level="warning",
        access_log=False,
    )
    return 0
