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
            "names are claimed (a name not held: nothing is claimed, COMMAND is not "
            "run, exit 2); with neither, everything held. The sockets are claimed "
            "before COMMAND runs: its start-up does not count against the holder's TTL."
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
    from nodrop.holder.client import claim_matching, fresh_bind_note, unclaimed
    from nodrop.listeners.bind import resolve_all
    from nodrop.listeners.reconcile import acquire
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
        claimed = claim_matching(args.from_holder, targets, timeout=args.timeout)
        for target in unclaimed(targets, claimed):
            print(f"nodrop exec: {fresh_bind_note(target, args.from_holder)}", file=sys.stderr)
        held = acquire(targets, claimed)
    else:
        names = [n for n in args.names.split(",") if n] if args.names else None
        held = _claim_names(args.from_holder, names, args.timeout)
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


def _claim_names(path: str, names: list[str] | None, timeout: float) -> list[Any]:
    """Claim ``names`` (None: everything held), all or nothing.

    A name the holder no longer holds (its TTL ran out, or it was never
    parked) refuses the whole exec: the command would otherwise start without
    the socket it expects, and nothing would listen where clients connect.
    The names are looked up first so that a refusal claims nothing; one that
    expires between the look-up and the claim is caught after it, and what
    was claimed goes back.

    Raises:
        HolderError: no holder, it refused, or a name is not held.
    """
    from nodrop.holder.client import claim, list_parked

    if names:
        present = {p.name for p in list_parked(path, timeout=timeout)}
        _refuse_missing([n for n in names if n not in present])
    result = claim(path, names=names, timeout=timeout)
    if result.missing:
        _give_back(path, result.sockets)
        result.close()
        _refuse_missing(result.missing)
    return result.sockets


def _refuse_missing(missing: list[str]) -> None:
    from nodrop.errors import HolderError

    if missing:
        raise HolderError(
            f"not held: {', '.join(missing)} (its TTL ran out or it was never parked); "
            "command not run"
        )


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
