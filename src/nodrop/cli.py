"""The ``nodrop`` command line.

Each subcommand lives in its own module under :mod:`nodrop.commands` and
exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. This module only assembles them and maps
:class:`~nodrop.errors.NodropError` to a one-line message and an exit status
(:data:`EXIT_ERROR`, or :data:`EXIT_REFUSED` for a peer or a control
directory that is not trusted), so library code never prints or exits.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from nodrop._version import __version__
from nodrop.errors import NodropError, PeerDeniedError, UntrustedError

EXIT_ERROR = 2
"""Bad option, no supervisor, timeout, or any other error."""
EXIT_REFUSED = 4
"""Refused for who we are or who answered: our uid is not allowed on the
socket, or the control socket or its directory is not ours (docs/security.md)."""

# Order is the order of `nodrop --help`.
COMMANDS = (
    "run",
    "reload",
    "status",
    "stop",
    "reexec",
    "hold",
    "exec",
    "bench",
    "demo",
    "doctor",
)

DESCRIPTION = """\
Reload Linux network servers without dropping a connection.

nodrop keeps your listening sockets open across deploys: `nodrop run` binds
them once and starts your server with them (systemd's LISTEN_FDS protocol);
`nodrop reload` starts the new version, waits until it is ready, and only then
lets the old one drain. A broken new version is rolled back and the old one
keeps serving.
"""

EPILOG = """\
examples:
  nodrop demo                                   see a zero-drop reload under load
  nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.uvicorn app:app
  nodrop reload                                 new generation, or rollback (exit 1)
  nodrop status --json
  nodrop doctor                                 what this kernel can migrate

exit status:
  0  done (reload: the new generation serves; status: serving)
  1  reload rolled back: the new generation failed, the old one keeps serving
  2  error: bad option, no supervisor answers, timeout
  3  status: no generation serving
  4  refused: our uid is not allowed on the socket, or the control socket or
     its directory is not ours (wrong owner, symlink, group/other-writable)

Run `nodrop COMMAND --help` for each command's options.
"""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (not usage and then the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nodrop",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nodrop {__version__}")
    # Not dest="command": `nodrop run`'s own positional CMD is called that.
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"nodrop.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nodrop.commands.{name}":
                continue  # not built into this version
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (PeerDeniedError, UntrustedError) as exc:
        print(f"nodrop {args.subcommand}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except NodropError as exc:
        print(f"nodrop {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
