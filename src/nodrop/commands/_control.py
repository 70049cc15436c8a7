"""Shared options of the commands that talk to a running supervisor."""

from __future__ import annotations

import argparse


def add_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="the supervisor's control socket (default: $NODROP_CONTROL, else the one "
        "for --name, else the only supervisor running; see `nodrop status --all`)",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="the supervisor started with `nodrop run --name NAME` (or the name "
        "`nodrop status --all` shows)",
    )


def control_path(args: argparse.Namespace) -> str:
    from nodrop.supervisor.discovery import resolve

    return resolve(args.control, getattr(args, "name", None))
