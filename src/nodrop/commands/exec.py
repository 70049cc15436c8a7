"""``nodrop exec``: claim sockets from a holder and become the server.

The process claims its listeners, puts them at fds 3.. with ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID`` (its own pid, which the command keeps
across ``execve``), and execs the command: no supervisor stays behind.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
from typing import Any

from nodrop.commands._numbers import positive_seconds
from nodrop.systemd.activation import SD_LISTEN_FDS_START, activation_env
from nodrop.systemd.spawn import close_strays_on_exec


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "exec",
        help="claim sockets from a holder and exec a command with them (LISTEN_FDS)",
        description=(
            "Claim listening sockets from `nodrop hold` and exec COMMAND with them "
            "at fds 3.., systemd style (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID). "
            "With --listen, the held sockets whose kernel identity matches a spec "
            "are claimed and any missing listener is bound; held sockets nobody "
            "wants stay in the holder until their TTL ends. With --names, those "
            "names are claimed; with neither, everything held."
        ),
    )
    parser.add_argument("--from-holder", required=True, metavar="PATH", help="the holder")
    parser.add_argument(
        "--listen", action="append", default=[], metavar="SPEC", help="a listener (repeatable)"
    )
    parser.add_argument("--names", default=None, help="claim these names (a,b,...)")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="holder deadline, seconds"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.errors import ConfigError
    from nodrop.holder.client import claim, claim_listeners
    from nodrop.listeners.bind import resolve_all
    from nodrop.listeners.spec import parse_spec

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("nodrop exec: no command given (… -- COMMAND ARGS)")
    if args.listen and args.names:
        raise ConfigError("give --listen or --names, not both")
    # Find the program before claiming anything: a typo must not cost the
    # holder its sockets.
    if shutil.which(command[0]) is None:
        raise ConfigError(f"command not found: {command[0]}")
    if args.listen:
        targets = resolve_all([parse_spec(text) for text in args.listen])
        held = claim_listeners(args.from_holder, targets, timeout=args.timeout)
    else:
        names = [n for n in args.names.split(",") if n] if args.names else None
        result = claim(args.from_holder, names=names, timeout=args.timeout)
        if result.missing:
            print(f"nodrop exec: not held: {', '.join(result.missing)}", file=sys.stderr)
        held = result.sockets
    names_out = [h.name for h in held]
    env = dict(os.environ)
    env.update(activation_env(names_out))
    env["LISTEN_PID"] = str(os.getpid())
    try:
        _into_place([h.sock.fileno() for h in held])
        os.execvpe(command[0], command, env)
    except OSError as exc:
        _give_back(args.from_holder, held)
        print(f"nodrop exec: cannot exec {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execvpe does not return


def _into_place(fds: list[int]) -> None:
    """Put ``fds`` at 3, 4, ... inheritable; make every other fd close-on-exec.

    Each source is first copied above the target range, so a source sitting
    at another's target number is not overwritten.
    """
    floor = SD_LISTEN_FDS_START + len(fds)
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    close_strays_on_exec()
    for i, temp in enumerate(temps):
        os.dup2(temp, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(temp)


def _give_back(path: str, held: list[Any]) -> None:
    """exec failed: put the claimed sockets back so they are not lost."""
    from nodrop.errors import NodropError
    from nodrop.holder.client import deposit

    if not held:
        return
    try:
        deposit(path, held)
    except NodropError as exc:
        print(f"nodrop exec: could not return the sockets: {exc}", file=sys.stderr)
