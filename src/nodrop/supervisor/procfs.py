"""What ``/proc`` says about a generation's processes: which sockets they
hold (and, with :mod:`.sockdiag`, which of them are connections they serve).

The supervisor is not on the data path; this is how it sees the data path
without being on it. It reads, never writes, and everything it reads may
vanish under it (a process exits): every reader returns what it could read.
The parsers are pure and tested table-driven.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

from nodrop.supervisor.sockdiag import Connection

PROC = "/proc"


def parse_socket_link(target: str) -> int | None:
    """``socket:[12345]`` -> 12345; anything else -> None (pure)."""
    if target.startswith("socket:[") and target.endswith("]"):
        with contextlib.suppress(ValueError):
            return int(target[8:-1])
    return None


def parse_children(text: str) -> list[int]:
    """``/proc/PID/task/TID/children``: pids separated by spaces (pure)."""
    return [int(p) for p in text.split()]


def descendants(pid: int, proc: str = PROC) -> list[int]:
    """``pid`` and every process below it (a gunicorn arbiter's workers)."""
    found = [pid]
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        try:
            tasks = os.listdir(f"{proc}/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"{proc}/{current}/task/{tid}/children") as f:
                    kids = parse_children(f.read())
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def socket_inodes(pid: int, proc: str = PROC) -> set[int] | None:
    """The inodes of the sockets ``pid`` holds; None if its fds cannot be
    read (gone, or another user's)."""
    try:
        names = os.listdir(f"{proc}/{pid}/fd")
    except FileNotFoundError:
        return set()  # exited: holds nothing
    except OSError:
        return None
    out = set()
    for name in names:
        try:
            inode = parse_socket_link(os.readlink(f"{proc}/{pid}/fd/{name}"))
        except OSError:
            continue
        if inode is not None:
            out.add(inode)
    return out


def sockets_of(pids: Iterable[int], proc: str = PROC) -> set[int] | None:
    """Every socket inode held by ``pids`` and their descendants; None if
    one of them could not be read."""
    out: set[int] = set()
    for pid in pids:
        for member in descendants(pid, proc):
            held = socket_inodes(member, proc)
            if held is None:
                return None
            out |= held
    return out


def served_connections(
    held: set[int], table: Mapping[int, Connection], ports: set[tuple[str, int]]
) -> set[int]:
    """Which of the ``held`` socket inodes are connections accepted on one
    of the listening addresses ``ports`` (ip, port; ``0.0.0.0``/``::`` for
    any) -- not the process's own outgoing connections (pure)."""
    wildcard = {port for ip, port in ports if ip in ("0.0.0.0", "::")}
    out = set()
    for inode in held:
        sock = table.get(inode)
        if sock is None:
            continue
        if sock.local_port in wildcard or (sock.local_ip, sock.local_port) in ports:
            out.add(inode)
    return out
