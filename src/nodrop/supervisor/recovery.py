"""The recovery state: what a supervisor killed with SIGKILL leaves for the
next one (docs/recovery.md).

A supervisor keeps one small JSON file beside its control socket
(``NAME.sock.state``), rewritten atomically (a temporary file renamed over
it) after every spawn, exit and change of state. It lists every worker that
may outlive it -- pid and start time (so a recycled pid is never taken for
a worker), generation, the fd numbers at which the worker holds each
listening socket and the read ends of its own output pipes -- and each
listener's kernel identity. A supervisor started with the same control
socket reads it (:mod:`.takeover`) and takes over.

Building the record is pure (:func:`build_state`); :class:`StateFile` does
the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

from nodrop.kernel.pidfd import start_time
from nodrop.listeners.held import HeldSocket
from nodrop.supervisor.model import Generation

STATE_VERSION = 1
SD_LISTEN_FDS_START = 3


class ListenerRecord(TypedDict):
    inode: int
    name: str
    spec: str | None
    identity: list[Any]


class WorkerRecord(TypedDict):
    pid: int
    started: int
    """Clock ticks since boot (``/proc/PID/stat``): with the pid, one process."""
    generation: int
    index: int
    state: str
    listeners: list[int]
    """Inodes of the listening sockets it holds at fds 3, 4, ..."""
    output: list[int]
    """Fd numbers at which it holds the read ends of its stdout and stderr pipes."""


class RecoveryState(TypedDict):
    version: int
    supervisor: int
    supervisor_started: int
    next_number: int
    listeners: list[ListenerRecord]
    workers: list[WorkerRecord]


def state_path(control_path: str) -> str:
    """Where the supervisor of ``control_path`` keeps its recovery state."""
    return control_path + ".state"


def listener_record(held: HeldSocket) -> ListenerRecord:
    return {
        "inode": os.fstat(held.fileno()).st_ino,
        "name": held.name,
        "spec": None if held.spec is None else held.spec.text,
        "identity": held.identity.to_wire(),
    }


def build_state(
    supervisor: tuple[int, int],
    next_number: int,
    generations: Iterable[Generation],
    inodes: dict[int, int],
    started: dict[int, int],
    carried: Sequence[WorkerRecord] = (),
    listeners: Sequence[ListenerRecord] = (),
) -> RecoveryState:
    """The record of every live worker (pure).

    Args:
        supervisor: our pid and start time.
        inodes: ``id(held socket)`` -> its inode, for every listener of
            ``generations``.
        started: pid -> start time, for every live worker.
        carried: workers a predecessor left that still run (kept listed
            until they exit, so a supervisor that dies while taking over
            passes them on too), and ``listeners`` the records of their sockets.
    """
    workers: list[WorkerRecord] = list(carried)
    for gen in generations:
        for worker in gen.live_workers():
            if worker.pid not in started:
                continue
            workers.append(
                {
                    "pid": worker.pid,
                    "started": started[worker.pid],
                    "generation": gen.number,
                    "index": worker.index,
                    "state": worker.state.value,
                    "listeners": [inodes[id(h)] for h in gen.listeners],
                    "output": list(worker.output_fds),
                }
            )
    return {
        "version": STATE_VERSION,
        "supervisor": supervisor[0],
        "supervisor_started": supervisor[1],
        "next_number": next_number,
        "listeners": list(listeners),
        "workers": workers,
    }


def parse_state(data: bytes) -> RecoveryState:
    """The state from the file's bytes (pure). Raises ValueError if malformed."""
    state = json.loads(data)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("not a nodrop recovery state of a known version")
    for key, kind in (
        ("supervisor", int),
        ("supervisor_started", int),
        ("next_number", int),
        ("listeners", list),
        ("workers", list),
    ):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"recovery state: {key!r} missing or not {kind.__name__}")
    for worker in state["workers"]:
        if not isinstance(worker, dict) or not all(
            isinstance(worker.get(k), int) for k in ("pid", "started", "generation", "index")
        ):
            raise ValueError(f"recovery state: malformed worker {worker!r}")
        if not all(
            isinstance(x, int) for x in worker.get("listeners", []) + worker.get("output", [])
        ):
            raise ValueError(f"recovery state: malformed worker {worker!r}")
    out: RecoveryState = state  # type: ignore[assignment]  # checked above
    return out


class StateFile:
    """Writes a supervisor's recovery state after each change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._me = (os.getpid(), start_time(os.getpid()) or 0)
        self._started: dict[int, int] = {}
        self.carried: list[WorkerRecord] = []
        self.carried_listeners: list[ListenerRecord] = []
        self.enabled = True

    def write(self, generations: Sequence[Generation], next_number: int) -> None:
        if not self.enabled:
            return
        live = {w.pid for g in generations for w in g.live_workers()}
        self._started = {pid: t for pid, t in self._started.items() if pid in live}
        for pid in live - self._started.keys():
            ticks = start_time(pid)
            if ticks is not None:
                self._started[pid] = ticks
        inodes: dict[int, int] = {}
        records = {r["inode"]: r for r in self.carried_listeners}
        for gen in generations:
            for held in gen.listeners:
                if id(held) not in inodes and held.fileno() >= 0:
                    record = listener_record(held)
                    inodes[id(held)] = record["inode"]
                    records[record["inode"]] = record
        live_gens = [
            g for g in generations if g.live_workers() and all(id(h) in inodes for h in g.listeners)
        ]
        state = build_state(
            self._me,
            next_number,
            live_gens,
            inodes,
            self._started,
            self.carried,
            list(records.values()),
        )
        data = json.dumps(state).encode()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one

    def remove(self) -> None:
        self.enabled = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_state(path: str) -> RecoveryState | None:
    """The state a dead supervisor left at ``path``; None if there is none
    or it cannot be read (then there is nothing to take over)."""
    try:
        with open(path, "rb") as f:
            return parse_state(f.read())
    except (OSError, ValueError):
        return None
