"""``nodrop status``: generations, workers, listeners and reload history."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nodrop.commands._control import add_control_argument, control_path
from nodrop.supervisor.timing import describe as describe_timing

UNNAMED = "unknown"
"""The LISTEN_FDNAMES entry of a listener nobody named."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show generations, workers, listeners and recent reloads",
        description=(
            "Show what the supervisor runs: each generation (starting, active, "
            "draining) with its workers' pids and ages, the listeners with their "
            "accept-queue depth, recent reloads with outcome, duration and ledger "
            "(what became of the old generation's connections), and warnings. "
            "Exits 0 when a generation is active and serving with every worker it asks for "
            "(usable as a readiness probe), 3 otherwise (also when degraded: fewer live workers "
            "than asked), 2 when no supervisor answers."
        ),
    )
    add_control_argument(parser)
    parser.add_argument(
        "--format",
        choices=["text", "json", "prometheus"],
        default="text",
        help="text (default); json (one JSON document); prometheus (the text exposition "
        "format, for a scrape through node_exporter's textfile collector or similar)",
    )
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument(
        "--all",
        action="store_true",
        help="list every supervisor whose control socket is in the control directory",
    )
    parser.set_defaults(func=run)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def format_worker(w: dict[str, Any]) -> str:
    extra = f", {w['restarts']} restarts" if w["restarts"] else ""
    code = f", exit {w['exit_code']}" if w["exit_code"] is not None else ""
    state = w["state"]
    if state == "draining" and w.get("said_stopping"):
        state = "draining (stopped accepting)"
    # A STATUS= text describes the worker as it was when it sent it: only
    # while it starts or serves is it current.
    text = f": {w['status']}" if w["status"] and w["state"] in ("starting", "ready") else ""
    return f"    worker {w['index']}: pid {w['pid']} {state}{code}{extra}{text}"


def format_ledger(ledger: dict[str, Any]) -> str:
    from nodrop.supervisor.ledger import fates

    if not ledger["complete"]:
        return f"      generation {ledger['generation']}: draining"
    return (
        f"      generation {ledger['generation']} drained in {ledger['drain_duration']:.2f}s: "
        + fates(ledger)
    )


def format_status(status: dict[str, Any]) -> str:
    name = f"{status['name']}: " if status.get("name") else ""
    lines = [
        f"{name}supervisor pid {status['pid']}, up {status['uptime']:.0f}s, "
        f"strategy {status['strategy']}: {status['summary']}"
    ]
    for gen in status["generations"]:
        where = f" in {gen['cwd']}" if gen.get("cwd") else ""
        note = _first_line(gen["note"])
        lines.append(
            f"  generation {gen['generation']}: {gen['state']}, age {gen['age']:.1f}s{where}"
            + (f" ({note})" if note else "")
        )
        lines += [format_worker(w) for w in gen["workers"]]
    for lst in status["listeners"]:
        queue = (
            ""
            if lst["accept_queue"] is None
            else f", accept queue {lst['accept_queue']}/{lst['backlog']}"
        )
        label = "" if lst["name"] in (UNNAMED, "", None) else f" {lst['name']}:"
        lines.append(f"  listener{label} {lst['identity']}{queue}")
    for r in status["reloads"][-5:]:
        mark = "ok" if r["ok"] else "FAILED"
        lines.append(
            f"  reload -> generation {r['generation']}: {mark} in {r['duration']:.3f}s: "
            f"{_first_line(r['message'])}"
        )
        if r.get("timing"):
            lines.append(f"    time: {describe_timing(r['timing'])}")
        lines += [format_ledger(ledger) for ledger in r.get("ledger", [])]
    handoff = status.get("handoff")
    if handoff:
        lines.append(
            f"  connection handoff: {handoff['receivers']} receiver(s); given {handoff['given']}, "
            f"placed {handoff['placed']}, returned {handoff['returned']}, closed {handoff['closed']}"
        )
    for w in status["warnings"]:
        lines.append(f"  warning: {_first_line(w)}")
    return "\n".join(lines)


def serving(status: dict[str, Any]) -> bool:
    return (
        status.get("active_generation") is not None
        and not status.get("stopping")
        and not status.get("degraded")
    )


def run_all(fmt: str) -> int:
    from nodrop.errors import ConfigError
    from nodrop.supervisor.discovery import control_dir, discover

    if fmt == "prometheus":
        raise ConfigError("--all --format prometheus: scrape each supervisor on its own")
    found = discover()
    if fmt == "json":
        print(
            json.dumps([{"name": f.name, "control": f.path, **f.status} for f in found], indent=2)
        )
    elif not found:
        print(f"no supervisor answers in {control_dir()}")
    else:
        for f in found:
            print(f"{f.name}: pid {f.status.get('pid')}, {f.status.get('summary', '')} ({f.path})")
    if not found:
        return 2
    return 0 if all(serving(f.status) for f in found) else 3


def run(args: argparse.Namespace) -> int:
    from nodrop.supervisor.control import request
    from nodrop.supervisor.metrics import render_prometheus

    fmt = "json" if args.json else args.format
    if args.all:
        return run_all(fmt)
    status = request(control_path(args), "status", timeout=10)
    if fmt == "json":
        print(json.dumps(status, indent=2))
    elif fmt == "prometheus":
        print(render_prometheus(status), end="")
    else:
        print(format_status(status))
    return 0 if serving(status) else 3
