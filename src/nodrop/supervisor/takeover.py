"""Taking over from a supervisor that was killed (docs/recovery.md).

``nodrop run`` started again with the same control socket finds the
recovery state its predecessor left (:mod:`.recovery`). If that supervisor
is gone and some of its workers still run, the new one

1. opens a pidfd of each (checking its start time: a recycled pid is not a worker),
2. copies their listening sockets with ``pidfd_getfd(2)`` (checking each
   socket's kernel identity against the record) and serves its first
   generation on those very sockets -- the kernel queue is never closed, so
   no connection is refused or reset --,
3. copies the read ends of their output pipes (which the workers hold
   themselves, so their writes never failed meanwhile) and passes their
   output on, tagged as before,
4. once its own generation is ready, drains them with their drain signal
   through the pidfd, and SIGKILLs what is left at the drain timeout.

If the new supervisor cannot start its generation, the orphans are left
serving and listed in the state file for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nodrop.kernel.pidfd import getfd, open_process, send_signal
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import SocketIdentity, identify
from nodrop.listeners.spec import parse_spec
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.logsink import say
from nodrop.supervisor.output import WorkerOutput
from nodrop.supervisor.recovery import (
    SD_LISTEN_FDS_START,
    ListenerRecord,
    RecoveryState,
    StateFile,
    WorkerRecord,
    read_state,
    state_path,
)

if TYPE_CHECKING:
    from nodrop.supervisor.config import RunConfig
    from nodrop.supervisor.generations import GenerationSet

Log = Callable[[str], None]
SO_DETACH_FILTER = 27


class Host(Protocol):
    """What recovery uses of the supervisor (which is one; this module does
    not import it, so the two form no cycle)."""

    gens: GenerationSet
    output: WorkerOutput
    config: RunConfig

    @property
    def stopping(self) -> bool: ...

    def log(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


@dataclass(eq=False)
class Orphan:
    """A worker of a dead supervisor, held by its pidfd."""

    record: WorkerRecord
    pidfd: int
    output: list[int] = field(default_factory=list)
    exited: bool = False

    @property
    def pid(self) -> int:
        return self.record["pid"]

    @property
    def label(self) -> str:
        return f"g{self.record['generation']}.w{self.record['index']}"


def _take_socket(orphan: Orphan, fd: int, record: ListenerRecord) -> HeldSocket | None:
    try:
        mine = getfd(orphan.pidfd, fd)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=mine)
    except OSError:
        os.close(mine)
        return None
    try:
        same = os.fstat(sock.fileno()).st_ino == record["inode"] and (
            identify(sock).key == SocketIdentity.from_wire(record["identity"]).key
        )
    except (OSError, ValueError):
        same = False
    if not same:
        sock.close()
        return None
    # A supervisor killed while stopping left its SYN-dropping filter on
    # the socket (see .stopping): we serve on it again.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    spec = None if record["spec"] is None else parse_spec(record["spec"])
    return HeldSocket.adopt(sock, record["name"], spec)


def _take_pipe(orphan: Orphan, fd: int) -> int | None:
    try:
        mine = getfd(orphan.pidfd, fd)
    except OSError:
        return None
    if not stat.S_ISFIFO(os.fstat(mine).st_mode):
        os.close(mine)
        return None
    return mine


class Orphans:
    """The workers a dead supervisor left, and what we took from them."""

    def __init__(
        self, state: RecoveryState, orphans: list[Orphan], listeners: list[HeldSocket]
    ) -> None:
        self.state = state
        self.orphans = orphans
        self.listeners = listeners
        self.draining_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._output: WorkerOutput | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self.on_change: Callable[[], None] = lambda: None
        self.log: Log = lambda _m: None

    @classmethod
    def find(cls, control_path: str, log: Log) -> Orphans | None:
        """What the dead supervisor of ``control_path`` left running, taken
        over; None if there is nothing (no state, the supervisor still runs,
        no worker left)."""
        path = state_path(control_path)
        state = read_state(path)
        if state is None:
            return None
        previous = open_process(state["supervisor"], state["supervisor_started"])
        if previous is not None:  # it still runs: it is not ours to take over
            os.close(previous)
            return None
        orphans = []
        for record in state["workers"]:
            pidfd = open_process(record["pid"], record["started"])
            if pidfd is not None:
                orphans.append(Orphan(record, pidfd))
        if not orphans:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        listeners = []
        for lrec in state["listeners"]:
            for orphan in orphans:
                if lrec["inode"] in orphan.record["listeners"]:
                    fd = SD_LISTEN_FDS_START + orphan.record["listeners"].index(lrec["inode"])
                    held = _take_socket(orphan, fd, lrec)
                    if held is not None:
                        listeners.append(held)
                        break
        for orphan in orphans:
            pipes = [_take_pipe(orphan, fd) for fd in orphan.record.get("output", [])]
            orphan.output = [fd for fd in pipes if fd is not None]
            if len(orphan.output) != 2:
                for fd in orphan.output:
                    os.close(fd)
                orphan.output = []
        log(
            f"taking over from supervisor pid {state['supervisor']} (killed): "
            f"{len(orphans)} worker(s) ("
            + ", ".join(f"{o.label} pid {o.pid}" for o in orphans)
            + f") and {len(listeners)} listening socket(s)"
        )
        return cls(state, orphans, listeners)

    @property
    def next_number(self) -> int:
        return self.state["next_number"]

    def live(self) -> list[Orphan]:
        return [o for o in self.orphans if not o.exited]

    def live_records(self) -> tuple[list[WorkerRecord], list[ListenerRecord]]:
        """What the state file must keep listing while they run."""
        inodes = {i for o in self.live() for i in o.record["listeners"]}
        return [o.record for o in self.live()], [
            r for r in self.state["listeners"] if r["inode"] in inodes
        ]

    # -- on the supervisor's loop ------------------------------------------------
    def watch(self, output: WorkerOutput, log: Log, on_change: Callable[[], None]) -> None:
        """Pass their output on and learn of each exit (a pidfd turns readable)."""
        self._loop = asyncio.get_running_loop()
        self._output = output
        self.log = log
        self.on_change = on_change
        for orphan in self.live():
            if orphan.output:
                output.attach(orphan.pid, orphan.label, orphan.output, lambda _line: None)
            self._loop.add_reader(orphan.pidfd, self._exited, orphan)

    def _exited(self, orphan: Orphan) -> None:
        if orphan.exited:
            return
        orphan.exited = True
        assert self._loop is not None
        self._loop.remove_reader(orphan.pidfd)
        os.close(orphan.pidfd)
        if self._output is not None:
            self._output.detach(orphan.pid)
        left = len(self.live())
        self.log(
            f"worker {orphan.label} (pid {orphan.pid}) of the killed supervisor exited; {left} left"
        )
        if not left and self._kill_timer is not None:
            self._kill_timer.cancel()
        self.on_change()

    def drain(self, config: RunConfig) -> None:
        """Our generation serves: send theirs its drain signal; SIGKILL at the timeout."""
        live = self.live()
        if not live or self.draining_since is not None or self._loop is None:
            return
        self.draining_since = self._loop.time()
        self.log(
            f"draining {len(live)} worker(s) of the killed supervisor "
            f"({signal.Signals(config.drain_signal).name}, {config.drain_timeout:g}s)"
        )
        for orphan in live:
            send_signal(orphan.pidfd, config.drain_signal)
        self._kill_timer = self._loop.call_later(config.drain_timeout, self.kill)

    def kill(self) -> None:
        for orphan in self.live():
            if send_signal(orphan.pidfd, signal.SIGKILL):
                # Its own children too (each worker leads its process group),
                # while the pidfd proves the group's leader is still it.
                with contextlib.suppress(OSError):
                    os.killpg(orphan.pid, signal.SIGKILL)

    def close(self) -> None:
        """Let go of them (they keep running unless killed first)."""
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        for orphan in self.live():
            if self._loop is not None:
                self._loop.remove_reader(orphan.pidfd)
            os.close(orphan.pidfd)
            orphan.exited = True

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": o.pid,
                "generation": o.record["generation"],
                "worker": o.record["index"],
                "draining": self.draining_since is not None,
            }
            for o in self.live()
        ]


class Recovery:
    """A supervisor's side of recovery: writes its state after every change,
    and drains the orphans it took over once its first generation serves."""

    def __init__(self, control_path: str, orphans: Orphans | None = None) -> None:
        self.file = StateFile(state_path(control_path))
        self.orphans = orphans
        self._sup: Host | None = None
        self._warned = False

    def start(self, sup: Host) -> None:
        """Before generation 1 starts."""
        self._sup = sup
        if self.orphans is not None:
            sup.gens.next_number = max(sup.gens.next_number, self.orphans.next_number)
            self.orphans.watch(sup.output, sup.log, self.write)
        sup.gens.on_change = self.write
        self.write()

    def write(self) -> None:
        sup = self._sup
        if sup is None:
            return
        if self.orphans is not None:
            self.file.carried, self.file.carried_listeners = self.orphans.live_records()
        try:
            self.file.write(sup.gens.all, sup.gens.next_number)
        except OSError as exc:  # a full disk must not stop the supervisor
            if not self._warned:
                self._warned = True
                sup.warn(f"cannot write the recovery state {self.file.path}: {exc}")

    def serving(self, config: RunConfig) -> None:
        """Generation 1 is ready: the orphans may go."""
        if self.orphans is not None:
            self.orphans.drain(config)

    def close(self) -> None:
        """The supervisor exits: kill orphans it was draining; if it was
        stopped before it drained them, send them their drain signal; if it
        could not start, keep them listed (serving) for the next attempt."""
        orphans = self.orphans
        sup = self._sup
        if orphans is not None and orphans.draining_since is not None:
            orphans.kill()
        elif orphans is not None and orphans.live() and sup is not None and sup.stopping:
            # Stopped while taking over: the service stops, they go too (their
            # drain signal; nobody is left to SIGKILL them at a timeout).
            orphans.drain(sup.config)
            self.file.remove()
            orphans.close()
            return
        if orphans is not None and orphans.live() and orphans.draining_since is None:
            self.file.carried, self.file.carried_listeners = orphans.live_records()
            with contextlib.suppress(OSError):
                self.file.write([], orphans.next_number)
            self.file.enabled = False
        else:
            self.file.remove()
        if orphans is not None:
            orphans.close()

    def status(self) -> list[dict[str, Any]]:
        return [] if self.orphans is None else self.orphans.status()


def take_over(control_path: str, listeners: ListenerProvider) -> Recovery:
    """``nodrop run``'s recovery: take over what a killed supervisor of
    ``control_path`` left (its listening sockets go to ``listeners``)."""
    orphans = Orphans.find(control_path, lambda m: say(f"nodrop: {m}"))
    if orphans is not None:
        # inherit: we serve on their very sockets. reuseport: we bind our own
        # beside theirs (same ports), and theirs drain and migrate.
        take = getattr(listeners, "take", None)  # both strategies have it
        if take is not None:
            take(orphans.listeners)
        else:
            for held in orphans.listeners:
                held.sock.close()
        orphans.listeners = []
    return Recovery(control_path, orphans)
