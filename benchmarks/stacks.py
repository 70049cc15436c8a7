"""The stack matrix: real apps on the servers people deploy, reloaded under
load, every failed request counted.

For each cell (an app on a server, see ``benchmarks/stack_matrix/cells.py``) this
starts the stack -- under ``nodrop run`` with 2 workers, or, for the ``+own``
rows, under the server's own master -- waits until it serves, starts the
clients, reloads it N times (each reload waits for the new generation to be
ready, then a short gap of traffic), waits for the last old generation to
drain, stops the clients and the stack, and prints one table. Nothing is
retried; every failure is recorded with its class. Exit status 1 if a
request failed in any nodrop cell (the +own rows are there to compare).

Clients (all at once, on persistent connections unless said otherwise):
  http.client    stdlib, never retries: the strictest. A request meeting EOF or
                 a reset on a connection the server had not marked closing fails.
  httpx          httpx.Client; reconnects silently when it sees a pooled
                 connection was closed before sending (counted apart).
  aiohttp        ClientSession; resends a GET once when the connection broke
                 (counted as hidden-retries, not failures).
  websocket      sessions held open; a session may only end with 1012.
  wrk-close      wrk, a new connection per request.
  wrk-keepalive  wrk on kept-alive connections.

examples:
  python benchmarks/stacks.py                                # full form: every cell, all clients, 10 reloads
  python benchmarks/stacks.py --cells fastapi/uvicorn-h11 --reloads 3
  python benchmarks/stacks.py --cells django/ --clients http.client wrk-close
  python benchmarks/stacks.py --list
  python benchmarks/stacks.py --reloads 0 --steady 20            # control run: steady state only
  PYTHONPATH=/path/to/branch/src python benchmarks/stacks.py   # another nodrop
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `stack_matrix` and `baselines`

import nodrop
from stack_matrix import cells as cells_mod
from stack_matrix.exercise import CLIENTS, ClientSet, Load, Reloads, check_loop, summarize
from stack_matrix.launch import DEFAULT_STARTUP, NodropStack, StartError, launch
from stack_matrix.table import render

PACKAGES = (
    "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "websockets", "h11",
    "uvicorn-worker", "gunicorn", "hypercorn", "aiohttp", "django", "flask", "httpx",
)  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/stacks.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        metavar="ID",
        help="cells to run: an id (fastapi/uvicorn-h11) or a prefix (django/, fastapi/gunicorn); "
        "default: all, with the +own rows",
    )
    parser.add_argument(
        "--no-own", action="store_true", help="leave out the servers' own reload rows"
    )
    parser.add_argument(
        "--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS), metavar="NAME",
        help=f"clients to run at once (default: all): {', '.join(CLIENTS)}",
    )  # fmt: skip
    parser.add_argument("--reloads", type=int, default=10, help="reloads per cell (default 10)")
    parser.add_argument(
        "--gap",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds of traffic after each reload is ready, before the next (default 1)",
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds of traffic before the first reload (default 0); with --reloads 0, "
        "a control run: what steady state fails, which no reload is to blame for",
    )
    parser.add_argument(
        "--startup",
        type=float,
        default=DEFAULT_STARTUP,
        metavar="S",
        help=f"the apps' start-up time, STARTUP_SECONDS (default {DEFAULT_STARTUP:g})",
    )
    parser.add_argument(
        "--connections", type=int, default=4, help="connections per Python client (default 4)"
    )
    parser.add_argument(
        "--wrk-connections", type=int, default=16, help="wrk's connections (default 16)"
    )
    parser.add_argument(
        "--cell-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="stop reloading a cell after S seconds (default 300)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' choices")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    return parser.parse_args(argv)


def run_cell(cell: cells_mod.Cell, args: argparse.Namespace, load: Load) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": cell.id,
        "kind": cell.kind.value,
        "stack": cell.stack,
        "command": shlex.join(cell.command()),
        "note": cell.note,
    }
    missing = cell.missing()
    if missing:
        result["skipped"] = missing
        return result
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stacks-") as tmp:
        try:
            stack = launch(cell, Path(tmp), startup=args.startup)
        except StartError as exc:
            result["error"] = f"did not start: {exc}"
            return result
        try:
            result["loop_check"] = check_loop(cell, stack.port)
            if result["loop_check"]:  # measured all the same, but the cell is not what it says
                result["error"] = result["loop_check"]
            reloads = Reloads()
            deadline = started + args.cell_timeout
            with ClientSet(stack.port, args.clients, cell, load) as clients:
                time.sleep(args.steady)  # traffic with no reload: the control
                for _ in range(args.reloads):
                    if time.monotonic() > deadline:
                        result["error"] = f"cell timeout: {len(reloads.results)} reloads done"
                        break
                    reloads.run(stack.reload, 1, args.gap)
                stack.settle()
            result["reloads"] = reloads.to_list()
            result["clients"] = summarize(clients.reports)
            if clients.warm_error:
                result["error"] = "; ".join(filter(None, [result.get("error"), clients.warm_error]))
            if isinstance(stack, NodropStack):
                result["active_generation"] = stack.status().get("active_generation")
        finally:
            result["exit_code"] = stack.stop()
            result["log_tail"] = stack.log(2000)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        selected = cells_mod.select(args.cells, own=not args.no_own)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        for cell in selected:
            print(f"{cell.id:<40} {cell.kind.value:<6} {shlex.join(cell.command())}")
        return 0
    load = Load(connections=args.connections, wrk_connections=args.wrk_connections, seed=args.seed)
    print(f"nodrop from {Path(nodrop.__file__).parent}", flush=True)
    results = []
    began = time.monotonic()
    for cell in selected:
        print(f"== {cell.id}: {shlex.join(cell.command())}", flush=True)
        result = run_cell(cell, args, load)
        results.append(result)
        if result.get("skipped"):
            print(f"   skipped: {result['skipped']}", flush=True)
        else:
            failed = sum(c["failed"] for c in result.get("clients", {}).values())
            print(
                f"   {failed} failed, {sum(r['ok'] for r in result.get('reloads', []))} reloads ok, "
                f"{result.get('seconds')} s{'; ' + result['error'] if result.get('error') else ''}",
                flush=True,
            )
    print()
    print(render(results, args.clients))
    print(f"\n{len(results)} cells in {time.monotonic() - began:.0f} s")
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "nodrop": str(Path(nodrop.__file__).parent),
            "versions": versions(),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "cells": results}, indent=2))
        print(f"wrote {args.json}")
    bad = [
        r["id"]
        for r in results
        if r["kind"] == "nodrop"
        and not r.get("skipped")
        and (
            r.get("error") or any(c["failed"] or c["error"] for c in r.get("clients", {}).values())
        )
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
