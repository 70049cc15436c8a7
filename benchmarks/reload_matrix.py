"""The reload matrix: nodrop against the tools people use, one run, same clients.

Rows: nodrop run (each strategy), the naive baselines (stop-then-start; two
SO_REUSEPORT generations handing over without migration), nginx ``-s
reload``, HAProxy master-worker (USR2) and gunicorn (HUP) when installed.
Cells: close mode and keep-alive mode, each with nodrop's load generator and
with wrk, under the same reload schedule; and 500 idle keep-alive
connections across one reload. Every row runs in its own private network
namespace (loopback only; the host's sysctls are never touched). Writes
``benchmarks/results/reload_matrix.md`` and ``.json``.

    sudo .venv/bin/python benchmarks/reload_matrix.py [--duration 10] [--reloads 5]

See ``docs/benchmarks.md`` for what each row and column means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `baselines`

from baselines import cells, servers
from baselines.table import render_markdown
from nodrop.errors import NetnsError
from nodrop.load import Mode
from nodrop.testing.netns import can_unshare_net, run_in_netns

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = ("close", "close-wrk", "keepalive", "keepalive-wrk", "idle")


@dataclasses.dataclass(frozen=True)
class Options:
    """What every cell of one run uses."""

    duration: float = 10.0
    reloads: int = 5
    concurrency: int = 32
    idle_connections: int = 500
    cells: tuple[str, ...] = CELLS
    wrk: str | None = None
    app: tuple[str, ...] = tuple(servers.DEMO_APP)
    row_timeout: float = 0.0


# --- one row (runs in a private network namespace when possible) --------------


class RowTimeout(BaseException):
    """The row ran past its deadline (a BaseException: no cell may swallow it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`RowTimeout` in the main thread after ``seconds`` (0: never).

    run_in_netns kills a child that overruns, which would leave the row's
    servers running; this deadline comes first, so they are stopped.
    """

    def expire(signum: int, frame: object) -> None:
        raise RowTimeout(f"row still running after {seconds:.0f} s; stopped")

    if seconds <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_cell(name: str, target: servers.Target, opts: Options) -> dict[str, Any]:
    mode = Mode.KEEPALIVE if name.startswith("keepalive") else Mode.CLOSE
    if name == "idle":
        return cells.idle_cell(target.port, target.reload, connections=opts.idle_connections)
    if name.endswith("-wrk"):
        if opts.wrk is None:
            return {"not_run": "wrk is not installed"}
        return cells.wrk_cell(
            opts.wrk,
            target.port,
            target.reload,
            mode,
            duration=opts.duration,
            reloads=opts.reloads,
            concurrency=opts.concurrency,
        )
    return cells.loadgen_cell(
        target.port,
        target.reload,
        mode,
        duration=opts.duration,
        reloads=opts.reloads,
        concurrency=opts.concurrency,
    )


def run_row(row: str, options_json: str) -> dict[str, Any]:
    """Start one row's server, run every cell against it, stop it. JSON-able."""
    fields: dict[str, Any] = json.loads(options_json)
    fields.update({k: tuple(fields[k]) for k in ("cells", "app") if k in fields})
    opts = Options(**fields)
    label, start = servers.ROWS[row]
    out: dict[str, Any] = {"row": row, "label": label, "cells": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix=f"reload-matrix-{row}-") as workdir:
        os.chmod(workdir, 0o755)  # nginx workers run as nobody
        try:
            with _deadline(opts.row_timeout), start(workdir, list(opts.app)) as target:
                out["notes"] = target.notes
                for name in opts.cells:
                    t0 = time.monotonic()
                    try:
                        out["cells"][name] = _run_cell(name, target, opts)
                    except Exception as exc:  # one broken cell must not lose the row
                        out["cells"][name] = {"error": repr(exc)[:1000]}
                    out["cells"][name]["wall_s"] = time.monotonic() - t0
        except servers.StartError as exc:
            out["not_run"] = str(exc)[-1500:]
        except RowTimeout as exc:
            out["timed_out"] = str(exc)
    return out


def row_timeout(opts: Options) -> float:
    """The most one row may take: start, every cell with its reloads, stop."""
    return 120.0 + len(opts.cells) * (opts.duration + 60.0)


def run_rows(rows: list[str], opts: Options, netns: bool) -> list[dict[str, Any]]:
    results = []
    limit = row_timeout(opts)
    options_json = json.dumps(dataclasses.asdict(dataclasses.replace(opts, row_timeout=limit - 30)))
    for row in rows:
        label = servers.ROWS[row][0]
        print(f"== {label}", file=sys.stderr, flush=True)
        if row == "naive-reuseport" and not netns:
            result = {"row": row, "label": label, "cells": {}, "notes": []}
            result["not_run"] = "needs a private network namespace (run as root)"
        elif netns:
            try:
                result = run_in_netns(
                    f"{Path(__file__).resolve()}:run_row", row, options_json, timeout=limit
                )
            except NetnsError as exc:
                result = {
                    "row": row,
                    "label": label,
                    "cells": {},
                    "notes": [],
                    "not_run": str(exc)[-1500:],
                }
        else:
            result = run_row(row, options_json)
        print(_progress(result), file=sys.stderr, flush=True)
        results.append(result)
    return results


def _progress(result: dict[str, Any]) -> str:
    if "timed_out" in result:
        return f"   {result['timed_out']}"
    if "not_run" in result:
        return f"   not run: {result['not_run'].strip().splitlines()[-1][:200]}"
    parts = []
    for name, cell in result["cells"].items():
        if "error" in cell or "not_run" in cell:
            parts.append(f"{name}: {cell.get('error') or cell.get('not_run')}"[:200])
        elif name == "idle":
            parts.append(f"idle: {cell['survived']}/{cell['connections']} survived")
        else:
            parts.append(f"{name}: {cell['failed']}/{cell['requests']} failed")
    return "   " + "; ".join(parts)


# --- machine facts ------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = ""
    mem_kib = 0
    with contextlib.suppress(OSError, StopIteration):
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    os_name = ""
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
    }


# --- command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=f"rows: {', '.join(servers.ROWS)}; cells: {', '.join(CELLS)}",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per cell (default 10)"
    )
    parser.add_argument("--reloads", type=int, default=5, help="reloads per cell (default 5)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent clients (default 32)"
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=500,
        help="idle connections in the idle cell (default 500)",
    )
    parser.add_argument(
        "--rows", default=",".join(servers.ROWS), help="comma-separated rows (default all)"
    )
    parser.add_argument(
        "--cells", default=",".join(CELLS), help="comma-separated cells (default all)"
    )
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk cells")
    parser.add_argument(
        "--app",
        metavar="FILE.py",
        help="run this copy of the demo app (e.g. `git show HEAD:src/nodrop/demo/app.py`) "
        "instead of `python -m nodrop.demo.app` in the nodrop and naive rows",
    )
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="run on the host's loopback (the naive SO_REUSEPORT row is skipped)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="directory for the results (default benchmarks/results)",
    )
    parser.add_argument(
        "--name", default="reload_matrix", help="file stem of the results (default reload_matrix)"
    )
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
    if bad := [r for r in rows if r not in servers.ROWS] + [c for c in wanted if c not in CELLS]:
        parser.error(f"unknown row or cell: {', '.join(bad)}")
    if args.duration <= 0 or args.duration > 600 or args.reloads < 0 or args.concurrency < 1:
        parser.error("need 0 < duration <= 600, reloads >= 0, concurrency >= 1")
    if not 0 < args.idle_connections <= 5000:
        parser.error("need 0 < --idle-connections <= 5000")
    args.rows_list = rows
    args.cells_list = [c for c in wanted if not (args.no_wrk and c.endswith("-wrk"))]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    netns = not args.no_netns
    if netns:
        ok, reason = can_unshare_net()
        if not ok:
            print(f"reload_matrix: {reason}; running on the host's loopback", file=sys.stderr)
            netns = False
    wrk = servers.which("wrk")
    opts = Options(
        duration=args.duration,
        reloads=args.reloads,
        concurrency=args.concurrency,
        idle_connections=args.idle_connections,
        cells=tuple(args.cells_list),
        wrk=wrk,
        app=(sys.executable, str(Path(args.app).resolve()))
        if args.app
        else tuple(servers.DEMO_APP),
    )
    tools = [
        f"{name}: {servers.version(argv) or 'not installed'}"
        for name, argv in (
            ("wrk", [wrk or "wrk", "-v"]),
            ("nginx", [servers.which("nginx") or "nginx", "-v"]),
            ("haproxy", [servers.which("haproxy") or "haproxy", "-v"]),
            ("gunicorn", [servers.which("gunicorn") or "gunicorn", "--version"]),
        )
    ]
    command = (
        " ".join(
            shlex.quote(a)
            for a in [".venv/bin/python", "benchmarks/reload_matrix.py", *sys.argv[1:]]
        )
        if argv is None
        else " ".join(shlex.quote(a) for a in ["benchmarks/reload_matrix.py", *argv])
    )
    load_before = os.getloadavg()
    t0 = time.monotonic()
    rows = run_rows(args.rows_list, opts, netns)
    doc = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.monotonic() - t0,
        "machine": machine_facts(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "netns": netns,
        "tools": tools,
        "options": dataclasses.asdict(opts),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"{args.name}.md", args.out / f"{args.name}.json"
    md.write_text(render_markdown(doc))
    js.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
