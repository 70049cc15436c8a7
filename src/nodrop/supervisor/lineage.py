"""Who may speak for a worker on the notify socket: the worker's own pid or
one of its descendants (systemd's ``NotifyAccess=all`` is narrower than that
in one way -- the service's cgroup -- and wider in another; see
docs/security.md).

The kernel stamps every notify datagram with the sender's pid
(``SCM_CREDENTIALS``); this module walks that pid's parent chain
(``/proc/PID/stat``, field 4) up to a worker. Joining a worker's *process
group* (``setpgid``), which any process of the same session may do, no
longer counts: only ancestry does, and a process cannot choose its parent.

A descendant that double-forks is re-parented to the supervisor (a
subreaper) and loses the right to speak: like systemd, nodrop then hears
only from the worker itself and its still-attached children.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

MAX_DEPTH = 32
"""Ancestors looked at, at most (a gunicorn worker is 1 below its arbiter)."""


def parse_ppid(stat: str) -> int | None:
    """The parent pid in a ``/proc/PID/stat`` line (pure), or None if garbled.

    The command name (field 2) is in parentheses and may itself contain
    spaces and ``)``: the fields after it start after the *last* ``)``.
    """
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def proc_parent(pid: int) -> int | None:
    """``pid``'s parent, from ``/proc``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return parse_ppid(f.read())
    except OSError:
        return None


def ancestry(pid: int, parent_of: Callable[[int], int | None]) -> Iterator[int]:
    """``pid``, its parent, its grandparent... (not pid 0 or 1), at most
    :data:`MAX_DEPTH` of them, never the same one twice."""
    seen: set[int] = set()
    current: int | None = pid
    while current is not None and current > 1 and current not in seen and len(seen) < MAX_DEPTH:
        yield current
        seen.add(current)
        current = parent_of(current)
