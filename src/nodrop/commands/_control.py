"""Shared options of the commands that talk to a running supervisor."""

from __future__ import annotations

import argparse


def add_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="the supervisor's control socket (default: $NODROP_CONTROL, else as `nodrop run`)",
    )


def control_path(args: argparse.Namespace) -> str:
    from nodrop.supervisor.control import default_control_path

    return str(args.control) if args.control else default_control_path()
