"""``nodrop bench``: drive load at a service while reloading it, and report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from nodrop.commands._numbers import positive_seconds, seconds
from nodrop.errors import ConfigError

if TYPE_CHECKING:
    from nodrop.load import LoadConfig, LoadResult
    from nodrop.load.runinfo import RunInfo

DESCRIPTION = """\
Drive real load at a service while reloading it, and report every failed
request (refused, reset, EOF before response, broken pipe, timeout, bad
status), latency percentiles in steady state and inside reload windows, each
reload's duration and outcome, and the load generator's own rate.

Reload through nodrop's supervisor (--control: exact reload windows, from the
reload's start until the old generation has exited), or with any command
(--reload-cmd 'nginx -s reload', 'kill -HUP PID') to measure other tools the
same way, or not at all (a steady-state baseline).
"""

EPILOG = """\
examples:
  nodrop bench --name myapp --duration 20 --reloads 10 --baseline --report myapp.html
  nodrop bench --control /run/myapp/nodrop.sock --duration 20 --reloads 10
  nodrop bench --target 127.0.0.1:8080 --reload-cmd 'nginx -s reload' --settle 1
  nodrop bench --target 127.0.0.1:8000 --mode keepalive --json
  nodrop bench --control ... --report reload.html     (a page with a timeline chart)
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure a service under load across reloads",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="where to send load (default: the supervisor's first TCP listener)",
    )
    parser.add_argument("--control", metavar="PATH", help="reload through this nodrop supervisor")
    parser.add_argument(
        "--name", metavar="NAME", help="reload through the supervisor `nodrop run --name NAME`"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure, in the same run and with the same load, nodrop's demo app "
        "restarted the naive way (stop, then start) on its own: the row that shows what "
        "the load generator counts when a restart does drop connections",
    )
    parser.add_argument(
        "--reload-cmd", metavar="CMD", help="reload by running this shell command instead"
    )
    parser.add_argument(
        "--settle",
        type=seconds,
        default=0.0,
        metavar="S",
        help="with --reload-cmd: count S seconds after the command into the reload window",
    )
    parser.add_argument(
        "--mode",
        choices=["close", "keepalive", "tcp"],
        default="close",
        help="close: new connection per request (default); keepalive: reuse connections; tcp: raw line protocol",
    )
    parser.add_argument(
        "--concurrency", "-c", type=int, default=32, help="requests in flight (default 32)"
    )
    parser.add_argument(
        "--duration",
        "-d",
        type=positive_seconds,
        default=20.0,
        metavar="S",
        help="seconds of load (default 20)",
    )
    parser.add_argument(
        "--reloads",
        "-n",
        type=int,
        default=10,
        help="reloads during the run (default 10; 0 for a baseline)",
    )
    parser.add_argument(
        "--every",
        type=positive_seconds,
        metavar="S",
        help="seconds between reloads (default: spread over the run)",
    )
    parser.add_argument(
        "--processes", type=int, help="load generator processes (default: one per core)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        metavar="S",
        help="deadline of one request (default 5)",
    )
    parser.add_argument("--max-requests", type=int, help="stop after this many requests")
    parser.add_argument("--path", default="/", help="HTTP request target (default /)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--report", metavar="FILE.html", help="also write a self-contained HTML report"
    )
    parser.set_defaults(func=run)


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--target {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


def target_from_supervisor(control: str) -> tuple[str, int]:
    from nodrop.supervisor.control import request

    status = request(control, "status", timeout=10)
    for listener in status.get("listeners", []):
        if listener["identity"].startswith("tcp "):
            host, port = parse_target(listener["address"])
            return ("127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host), port
    raise ConfigError("the supervisor has no TCP listener to send load to; give --target")


def run_info(args: argparse.Namespace, result: LoadResult, config: LoadConfig) -> RunInfo:
    """The report's context: command, versions, what served, the baseline."""
    from nodrop.load.baseline import LABEL, run_baseline
    from nodrop.load.runinfo import RunInfo, command_line, versions

    server, strategy, handoff = f"{config.host}:{config.port}", None, None
    if args.control:
        from nodrop.supervisor.control import request

        status = request(args.control, "status", timeout=10)
        active = [g for g in status.get("generations", []) if g.get("state") == "active"]
        if active:
            server = " ".join(active[0].get("command", []))
        strategy, handoff = status.get("strategy"), status.get("handoff") is not None
    baseline = None
    if args.baseline:
        print("nodrop bench: the baseline, same load against a naive restart...", file=sys.stderr)
        baseline = run_baseline(config)
    return RunInfo(
        command=command_line(),
        server=server,
        strategy=strategy,
        handoff=handoff,
        versions=versions(),
        baseline=baseline,
        baseline_label=LABEL if baseline is not None else "",
    )


def run(args: argparse.Namespace) -> int:
    from nodrop.load import (
        CommandReloader,
        LoadConfig,
        Mode,
        Reloader,
        format_table,
        render_html,
        run_load,
    )
    from nodrop.load.control_reloader import ControlReloader
    from nodrop.load.report import format_baseline

    if args.name and not args.control:
        from nodrop.supervisor.discovery import resolve

        args.control = resolve(None, args.name)
    if args.control and args.reload_cmd:
        raise ConfigError("give --control or --reload-cmd, not both")
    if args.target:
        host, port = parse_target(args.target)
    elif args.control:
        host, port = target_from_supervisor(args.control)
    else:
        raise ConfigError("give --target HOST:PORT (or --control to use the supervisor's listener)")
    reloader: Reloader | None = None
    if args.reloads:
        if args.control:
            reloader = ControlReloader(args.control)
        elif args.reload_cmd:
            reloader = CommandReloader(args.reload_cmd, settle=args.settle)
        else:
            raise ConfigError("--reloads needs --control or --reload-cmd (or use --reloads 0)")
    every = (
        args.every if args.every else args.duration / (args.reloads + 1) if args.reloads else 0.0
    )
    kwargs: dict[str, Any] = {}
    if args.max_requests:
        kwargs["max_requests"] = args.max_requests
    config = LoadConfig(
        host=host,
        port=port,
        mode=Mode(args.mode),
        concurrency=args.concurrency,
        duration=args.duration,
        timeout=args.timeout,
        processes=args.processes,
        path=args.path,
        reload_every=every,
        reloads=args.reloads if reloader else 0,
        **kwargs,
    )
    print(
        f"nodrop bench: {args.mode} load at {host}:{port} for {args.duration:g}s, {config.reloads} reloads",
        file=sys.stderr,
    )
    result = run_load(config, reloader)
    info = run_info(args, result, config)
    if args.json:
        print(json.dumps(result.to_dict() | {"run": info.to_dict()}, indent=2))
    else:
        print(format_table(result))
        if info.baseline is not None:
            print(format_baseline(result, info.baseline, info.baseline_label))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(render_html(result, info))
        print(f"report: {args.report}", file=sys.stderr)
    reloads_ok = all(r.ok for r in result.reloads)  # the baseline's failures are expected
    return 0 if result.failed == 0 and reloads_ok else 1
