"""``nodrop stop``: drain every generation, then stop the supervisor."""

from __future__ import annotations

import argparse
from typing import Any

from nodrop.commands._control import add_control_argument, control_path
from nodrop.commands._numbers import positive_seconds


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stop",
        help="drain every generation gracefully, then exit",
        description="Send every generation its drain signal, wait until all have exited "
        "(SIGKILL after the drain timeout), close the listeners and stop the supervisor.",
    )
    add_control_argument(parser)
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=600.0,
        metavar="S",
        help="give up waiting for the answer after S seconds (exit 2; the stop goes on; "
        "default 600). The workers' own limit is `nodrop run --drain-timeout`.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.supervisor.control import request

    answer = request(control_path(args), "stop", timeout=args.timeout)
    print(answer.get("message", ""))
    return 0 if answer.get("ok") else 1
