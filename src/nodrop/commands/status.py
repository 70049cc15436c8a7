"""``nodrop status``: generations, workers, listeners and reload history."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nodrop.commands._control import add_control_argument, control_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show generations, workers, listeners and recent reloads",
        description=(
            "Show what the supervisor runs: each generation (starting, active, "
            "draining) with its workers' pids and ages, the listeners with their "
            "accept-queue depth, recent reloads with outcome and duration, and warnings. "
            "Exits 0 when a generation is active and serving (usable as a readiness probe), "
            "3 otherwise."
        ),
    )
    add_control_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"supervisor pid {status['pid']}, up {status['uptime']:.0f}s, strategy {status['strategy']}: {status['summary']}"
    ]
    for gen in status["generations"]:
        lines.append(
            f"  generation {gen['generation']}: {gen['state']}, age {gen['age']:.1f}s {gen['note']}".rstrip()
        )
        for w in gen["workers"]:
            extra = f", {w['restarts']} restarts" if w["restarts"] else ""
            code = f", exit {w['exit_code']}" if w["exit_code"] is not None else ""
            lines.append(
                f"    worker {w['index']}: pid {w['pid']} {w['state']}{code}{extra} {w['status']}".rstrip()
            )
    for lst in status["listeners"]:
        queue = (
            ""
            if lst["accept_queue"] is None
            else f", accept queue {lst['accept_queue']}/{lst['backlog']}"
        )
        lines.append(f"  listener {lst['name']}: {lst['identity']}{queue}")
    for r in status["reloads"][-5:]:
        mark = "ok" if r["ok"] else "FAILED"
        lines.append(
            f"  reload -> generation {r['generation']}: {mark} in {r['duration']:.3f}s: {r['message'].splitlines()[0]}"
        )
    handoff = status.get("handoff")
    if handoff:
        lines.append(
            f"  connection handoff: {handoff['receivers']} receiver(s); given {handoff['given']}, "
            f"placed {handoff['placed']}, returned {handoff['returned']}, closed {handoff['closed']}"
        )
    for w in status["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nodrop.supervisor.control import request

    status = request(control_path(args), "status", timeout=10)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status.get("active_generation") is not None and not status.get("stopping") else 3
