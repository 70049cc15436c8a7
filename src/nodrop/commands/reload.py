"""``nodrop reload``: start the next generation; exit 0 when it serves, 1 on rollback."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nodrop.commands._control import add_control_argument, control_path
from nodrop.commands._numbers import positive_seconds


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="start the new generation; exit 0 when it serves, 1 if rolled back",
        description=(
            "Ask the supervisor to start the next generation (re-reading --config if it "
            "has one) and wait for the outcome. Exits 0 once every new worker is ready "
            "and the old generation has stopped accepting: from then on every new "
            "connection is served by the new generation, so a check right after the "
            "command sees the new version. An old worker has stopped accepting when it "
            "exited, closed the listening sockets, or sent STOPPING=1 to $NOTIFY_SOCKET "
            "(with --strategy reuseport and eBPF steering, at once). This wait is bounded "
            "(5 s, or the drain timeout if shorter); past it the command still exits 0 -- "
            "the new generation serves -- and says which old workers had not confirmed. "
            "Exits 1, printing why, if the new generation failed and was rolled back (the "
            "old one keeps serving); 2 if no supervisor answers or --timeout passes. "
            "Reloads asked for while one is starting are coalesced into one more reload."
        ),
    )
    add_control_argument(parser)
    parser.add_argument(
        "--wait",
        choices=["ready", "drained"],
        default="ready",
        help="return when the new generation is ready (default) or when the old one has exited",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=600.0,
        metavar="S",
        help="give up waiting after S seconds (exit 2; the reload goes on)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the outcome as one JSON document"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.supervisor.control import request

    answer = request(control_path(args), "reload", wait=args.wait, timeout=args.timeout)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        print(f"{answer['message']} ({answer.get('duration', 0):.3f}s)")
    else:
        print(f"reload failed: {answer.get('message')}")
    return 0 if answer.get("ok") else 1
