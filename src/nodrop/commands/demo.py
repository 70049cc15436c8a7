"""``nodrop demo``: see a zero-drop reload under load, with nothing else installed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nodrop.commands._numbers import positive_seconds


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
        "--duration",
        type=positive_seconds,
        default=20.0,
        metavar="S",
        help="seconds of load (default 20)",
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
        "--json",
        action="store_true",
        help="print the result as one JSON document instead of a table (the verdict line "
        "goes to stderr)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then run the same load for half as long against the demo app restarted the "
        "naive way (stop, then start), without nodrop: the report's baseline row "
        "(default on)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from nodrop._version import __version__
    from nodrop.demo.driver import DemoOptions, run_demo
    from nodrop.load import Mode, format_table, render_html
    from nodrop.load.baseline import LABEL, run_baseline
    from nodrop.load.report import format_baseline
    from nodrop.load.runinfo import NEXT_STEP, RunInfo, command_line, versions

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
    baseline = None
    if args.baseline:
        print(
            f"nodrop demo: the baseline, the same load for {options.duration / 2:g}s against "
            "a naive restart (stop, then start) of the demo app without nodrop...",
            file=sys.stderr,
            flush=True,
        )
        baseline = run_baseline(
            replace(
                result.config,
                duration=options.duration / 2,
                reloads=max(1, options.reloads // 2),
                reload_every=options.duration / 2 / (max(1, options.reloads // 2) + 1),
            )
        )
    info = RunInfo(
        command=command_line(),
        server=f"nodrop's demo app (python -m nodrop.demo.app), {options.workers} workers",
        strategy=options.strategy,
        handoff=options.mode is Mode.KEEPALIVE,
        versions=versions(server=f"nodrop.demo.app {__version__}"),
        baseline=baseline,
        baseline_label=LABEL if baseline is not None else "",
    )
    if args.json:
        print(json.dumps(result.to_dict() | {"run": info.to_dict()}, indent=2))
    else:
        print(format_table(result))
        if baseline is not None:
            print(format_baseline(result, baseline, LABEL))
    with open(report, "w", encoding="utf-8") as f:
        f.write(render_html(result, info))
    verdict = "no request failed" if result.failed == 0 else f"{result.failed} requests FAILED"
    # With --json, stdout holds the one JSON document and nothing else.
    out = sys.stderr if args.json else sys.stdout
    print(
        f"\n{verdict} across {len(result.reloads)} reloads; report: {os.path.abspath(report)}",
        file=out,
    )
    print(f"now run this against your app:\n  {NEXT_STEP}", file=out)
    return 0 if result.failed == 0 and all(r.ok for r in result.reloads) else 1
