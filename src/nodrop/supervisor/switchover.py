"""The switch-over from the old generation to the new: drain the old one, and know when it has
stopped accepting.

What ``nodrop reload`` promises when it exits 0: every *new* connection is
served by the new generation, because the old one has stopped accepting.
The drain signal alone does not give that: a worker takes a moment to act
on it, and until it does it keeps calling ``accept()`` on the shared socket
beside the new generation. So after the drain signal the supervisor waits,
bounded, until each old worker has

* exited, or
* closed the listening sockets (no fd of it or its children refers to them
  any more, as ``/proc/PID/fd`` shows) -- uvicorn, hypercorn, gunicorn's
  arbiter, lighttpd and the standard library servers do this; or
* sent ``STOPPING=1`` to ``$NOTIFY_SOCKET`` -- a server that stops calling
  ``accept()`` but keeps the socket open (``nodrop.adapters.drain``, the demo
  app) says so this way. It counts only for sockets the new generation
  shares (``inherit``): the kernel still queues connections on a socket
  that only the old generation has.

With ``--strategy reuseport`` and eBPF steering, the kernel sends every new
connection to the new generation's sockets from the moment it is active:
nothing to wait for. Past the bound (:data:`DEFAULT_ACCEPT_STOP_TIMEOUT`, or
the drain timeout if shorter) the reload still succeeds -- the new generation
serves -- and its answer says which old workers had not confirmed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nodrop.supervisor import procfs
from nodrop.supervisor.generations import GenerationSet
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.ledger import Ledgers
from nodrop.supervisor.model import Generation, ReloadOutcome, Worker, WorkerState
from nodrop.supervisor.timing import reload_timing

DEFAULT_ACCEPT_STOP_TIMEOUT = 5.0
"""How long a reload waits for the old generation to stop accepting."""
POLL_INTERVAL = 0.01
"""Closing an fd raises no event the supervisor could wait on; it looks."""


@dataclass(frozen=True)
class AcceptStop:
    """How the old generation stopped accepting (or did not, in time)."""

    confirmed: bool
    how: str
    """"steered" (eBPF: nothing to wait for), "stopped" (every old worker
    exited, closed the sockets or said STOPPING=1), "nothing" (no old
    worker), "timeout"."""
    seconds: float
    waiting: tuple[str, ...] = ()
    """Workers (``gN.wI``) not confirmed at the deadline."""
    began: float = 0.0
    """When the switch-over began (the supervisor's clock)."""
    signalled: float = 0.0
    """Seconds from ``began`` until the drain signals were sent."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "confirmed": self.confirmed,
            "how": self.how,
            "seconds": round(self.seconds, 6),
            "waiting": list(self.waiting),
        }

    def outcome(
        self,
        new: Generation,
        old: Sequence[Generation],
        started: float,
        finished: float,
        grace_over: float | None = None,
    ) -> ReloadOutcome:
        """The successful reload's answer: ``new`` ready, ``old`` draining, and this
        (``grace_over``: when the ready grace ended, for :mod:`.timing`)."""
        timing = None
        if grace_over is not None:
            timing = reload_timing(
                started,
                new,
                grace_over,
                self.began + self.signalled,
                self.began + self.seconds,
            )
            if not old:
                del timing["stop_accepting"]  # the first start: nothing to stop
        draining = f"; generation {', '.join(str(g.number) for g in old)} draining" if old else ""
        return ReloadOutcome(
            True,
            new.number,
            f"generation {new.number} ready{draining}{self.describe()}",
            started,
            finished,
            ready=new.ready_at,
            old_generations=tuple(g.number for g in old),
            old_stopped_accepting=self.to_dict() if old else None,
            timing=timing,
        )

    def describe(self) -> str:
        if self.confirmed:
            return ""
        return (
            f"; not confirmed within {self.seconds:.1f}s that the old generation stopped "
            f"accepting (worker(s) {', '.join(self.waiting)} still hold the listening "
            "sockets and sent no STOPPING=1): new connections may still reach them"
        )


def _inode(sock: socket.socket) -> int | None:
    fd = sock.fileno()
    return os.fstat(fd).st_ino if fd >= 0 else None


@dataclass(frozen=True)
class Watched:
    """The listening sockets whose ``accept()`` by the old generation matters."""

    shared: frozenset[int]
    """Also the new generation's: STOPPING=1 or closing them is enough."""
    exclusive: frozenset[int]
    """The old generation's alone (reuseport without eBPF): only closing
    them (or exiting) stops new connections from landing there."""

    @property
    def empty(self) -> bool:
        return not self.shared and not self.exclusive


def watched_sockets(old: Sequence[Generation], new: Generation, steered: bool) -> Watched:
    """Which sockets to watch (reads the sockets' inodes; call before the
    drain, when the supervisor may drop its copies)."""
    new_inodes = {i for h in new.listeners if (i := _inode(h.sock)) is not None}
    shared: set[int] = set()
    exclusive: set[int] = set()
    for gen in old:
        for held in gen.listeners:
            inode = _inode(held.sock)
            if inode is None:
                continue
            if inode in new_inodes:
                shared.add(inode)
            elif not (steered and held.identity.family in (socket.AF_INET, socket.AF_INET6)):
                exclusive.add(inode)
    return Watched(frozenset(shared), frozenset(exclusive))


def stopped_accepting(worker: Worker, watched: Watched, proc: str = procfs.PROC) -> bool:
    """Whether ``worker`` can no longer take a new connection."""
    if worker.state is WorkerState.EXITED:
        return True
    if worker.stopping_at is not None and not watched.exclusive:
        return True
    held = procfs.sockets_of([worker.pid], proc)
    if held is None:
        return False  # cannot look (another user's process): wait for it to exit
    relevant = (
        watched.exclusive if worker.stopping_at is not None else watched.shared | watched.exclusive
    )
    return not (held & relevant)


class Switchover:
    """Drains the generations a new one replaces and waits, bounded, until
    they have stopped accepting (see the module docstring).

    Args:
        gens: the supervisor's generations.
        listeners: the listener strategy (eBPF steering needs no wait).
        ledgers: the per-reload ledgers, opened at each drain.
        clock: the supervisor's monotonic clock.
        timeout: the bound (capped at the old generation's drain timeout).
    """

    def __init__(
        self,
        gens: GenerationSet,
        listeners: ListenerProvider,
        ledgers: Ledgers,
        clock: Callable[[], float],
        timeout: float = DEFAULT_ACCEPT_STOP_TIMEOUT,
        proc: str = procfs.PROC,
    ) -> None:
        self.gens = gens
        self.listeners = listeners
        self.ledgers = ledgers
        self.clock = clock
        self.timeout = timeout
        self.proc = proc

    @property
    def steered(self) -> bool:
        return (
            self.listeners.kind == "reuseport" and getattr(self.listeners, "method", "") == "ebpf"
        )

    async def replace(self, new: Generation, old: Sequence[Generation]) -> AcceptStop:
        """Drain ``old`` (``new`` is active) and wait until it stopped accepting."""
        started = self.clock()
        watched = watched_sockets(old, new, self.steered)
        for gen in old:
            self.ledgers.begin(gen, new.number, started)
            self.gens.drain(gen)
        self.gens.enforce_drain_cap(new.config.max_draining)
        sent = self.clock() - started
        workers = [w for gen in old for w in gen.workers]
        if not workers:
            return AcceptStop(True, "nothing", sent, began=started, signalled=sent)
        if watched.empty:
            return AcceptStop(True, "steered", sent, began=started, signalled=sent)
        bound = min([self.timeout, *(g.config.drain_timeout for g in old)])
        deadline = started + bound
        while True:
            waiting = [w for w in workers if not stopped_accepting(w, watched, self.proc)]
            if not waiting:
                for gen in old:
                    self.ledgers.stopped_accepting(gen)
                return AcceptStop(True, "stopped", self.clock() - started, (), started, sent)
            if self.clock() >= deadline:
                labels = tuple(w.label for w in waiting)
                return AcceptStop(False, "timeout", self.clock() - started, labels, started, sent)
            await asyncio.sleep(POLL_INTERVAL)
