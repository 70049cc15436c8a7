"""``nodrop reexec``: upgrade the supervisor's own program in place."""

from __future__ import annotations

import argparse
from typing import Any

from nodrop.commands._control import add_control_argument, control_path
from nodrop.commands._numbers import positive_seconds


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reexec",
        help="re-execute the supervisor's (upgraded) program in place",
        description=(
            "After upgrading nodrop, make the running supervisor exec the new "
            "program: same pid (systemd keeps tracking it), same listening sockets, "
            "same workers, its state carried across exec. Clients notice nothing: the "
            "workers keep serving throughout. Refused while a reload is in progress. "
            "Exits 0 once the new program answers."
        ),
    )
    add_control_argument(parser)
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="S")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.supervisor.control import request

    path = control_path(args)
    before = request(path, "status", timeout=args.timeout)
    answer = request(path, "reexec", timeout=args.timeout)
    if not answer.get("ok"):
        print(f"reexec refused: {answer.get('message')}")
        return 1
    # The control socket survives the exec: this waits in its queue until the
    # new program accepts, then answers.
    after = request(path, "status", timeout=args.timeout)
    if after.get("pid") != before.get("pid") or after.get("reexecs", 0) <= before.get("reexecs", 0):
        print("reexec: the supervisor did not come back as expected")
        return 1
    print(
        f"re-executed: pid {after['pid']}, generation {after.get('active_generation')} "
        f"still serving (re-exec #{after['reexecs']})"
    )
    return 0
