"""``nodrop demo``: see a zero-drop reload under load, with nothing else installed."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="reload a bundled app 10 times under load and show that nothing dropped",
        description=(
            "Start the bundled demo HTTP app under `nodrop run` with 2 workers, drive "
            "load at it for about 20 seconds while reloading it 10 times, print the "
            "results (failed requests by kind, latency in steady state vs during "
            "reloads, each reload's duration) and write an HTML report with a "
            "timeline chart. Stops everything it started. Exit status 0 when no "
            "request failed."
        ),
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, metavar="S", help="seconds of load (default 20)"
    )
    parser.add_argument(
        "--reloads", type=int, default=10, help="reloads during the run (default 10)"
    )
    parser.add_argument("--workers", type=int, default=2, help="workers per generation (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight (default 32)"
    )
    parser.add_argument(
        "--mode",
        choices=["close", "keepalive"],
        default="close",
        help="new connection per request (default), or keep-alive",
    )
    parser.add_argument("--strategy", choices=["inherit", "reuseport"], default="inherit")
    parser.add_argument(
        "--report",
        default="nodrop-demo-report.html",
        metavar="FILE.html",
        help="where to write the HTML report",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.demo.driver import DemoOptions, run_demo
    from nodrop.load import Mode, format_table, render_html

    options = DemoOptions(
        duration=args.duration,
        reloads=args.reloads,
        workers=args.workers,
        concurrency=args.concurrency,
        mode=Mode(args.mode),
        strategy=args.strategy,
        report=args.report,
    )
    result, report = run_demo(options)
    print(result.to_json() if args.json else format_table(result))
    with open(report, "w", encoding="utf-8") as f:
        f.write(render_html(result))
    verdict = "no request failed" if result.failed == 0 else f"{result.failed} requests FAILED"
    # With --json, stdout holds the one JSON document and nothing else.
    print(
        f"\n{verdict} across {len(result.reloads)} reloads; report: {os.path.abspath(report)}",
        file=sys.stderr if args.json else sys.stdout,
    )
    return 0 if result.failed == 0 and all(r.ok for r in result.reloads) else 1
