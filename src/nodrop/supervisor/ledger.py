"""The per-reload ledger: what became of the old generation's connections.

The supervisor is not on the data path, so it counts what it can see from
outside, and says how:

* ``open_at_drain``: TCP connections accepted on the listeners that the old
  generation's processes (and their children) held when the drain signal
  went out (``/proc/PID/fd`` joined with the kernel's ``sock_diag`` dump);
* ``accepted_while_draining``: connections seen when the old generation was
  confirmed to have stopped accepting that were not there at the drain
  signal (a lower bound: one accepted and closed between two looks is not
  seen);
* ``handed_over`` / ``returned`` / ``closed_by_broker``: connections the
  connection broker (``--handoff``) placed in the new generation, gave back
  to the old one (which then closes them itself, with a signal the client
  understands: ``Connection: close`` on the next response, WebSocket 1012),
  or closed itself with a FIN because the receiving worker died, while this
  generation drained (its counters, read at the drain signal and at the
  exit; with several generations draining at once they are shared out to
  the oldest);
* ``closed_by_signal``: connections still held when the drain timeout (or
  the drain cap) sent SIGKILL -- the kernel closed them, requests in flight
  included;
* ``finished``: the rest -- closed by the old generation itself before it
  exited, without being offered to the broker (``open_at_drain +
  accepted_while_draining - handed_over - returned - closed_by_broker -
  closed_by_signal``); the fates do not overlap;
* ``lost``: connections queued on a listening socket when it closed without
  a successor: 0 by construction when the listening sockets outlive the
  generation (``inherit``: nodrop holds them; ``reuseport`` with eBPF or
  ``tcp_migrate_req``: the kernel migrates the queue); ``None`` (unknown)
  with ``reuseport`` and no migration, where the old socket's queue is reset
  at its close and only the kernel saw how many.

What no supervisor off the data path can count: requests (as opposed to
connections), a connection the server itself reset or closed mid-request,
Unix-socket and UDP traffic, and connections whose whole life fell between
two looks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodrop.listeners.held import HeldSocket
from nodrop.supervisor import procfs, sockdiag
from nodrop.supervisor.model import Generation


@dataclass
class ReloadLedger:
    """One old generation's account, opened when it is told to drain."""

    generation: int
    replaced_by: int
    drain_started: float
    open_at_drain: int | None = None
    accepted_while_draining: int | None = None
    handed_over: int = 0
    returned: int = 0
    closed_by_broker: int = 0
    closed_by_signal: int = 0
    lost: int | None = 0
    exited: float | None = None
    seen: set[int] = field(default_factory=set, repr=False)
    broker_at_drain: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> int | None:
        if self.open_at_drain is None:
            return None
        total = self.open_at_drain + (self.accepted_while_draining or 0)
        moved = self.handed_over + self.returned + self.closed_by_broker
        return max(0, total - moved - self.closed_by_signal)

    @property
    def complete(self) -> bool:
        return self.exited is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "replaced_by": self.replaced_by,
            "complete": self.complete,
            "drain_duration": None
            if self.exited is None
            else round(self.exited - self.drain_started, 6),
            "open_at_drain": self.open_at_drain,
            "accepted_while_draining": self.accepted_while_draining,
            "finished": self.finished,
            "handed_over": self.handed_over,
            "returned": self.returned,
            "closed_by_broker": self.closed_by_broker,
            "closed_by_signal": self.closed_by_signal,
            "lost": self.lost,
        }

    def summary(self) -> str:
        def n(value: int | None) -> str:
            return "?" if value is None else str(value)

        return f"generation {self.generation} (replaced by {self.replaced_by}): " + fates(
            self.to_dict()
        )


def fates(ledger: dict[str, Any]) -> str:
    """What became of the connections, in words (pure; ``ledger`` is a
    :meth:`ReloadLedger.to_dict`, as ``nodrop status --json`` carries it)."""

    def n(key: str) -> str:
        value = ledger.get(key, 0)
        return "?" if value is None else str(value)

    return (
        f"{n('finished')} connection(s) finished, {n('handed_over')} handed over, "
        f"{n('returned')} returned (then closed with a signal), "
        f"{n('closed_by_broker')} closed by the broker, "
        f"{n('closed_by_signal')} closed by SIGKILL, {n('lost')} lost"
    )


def lost_is_known(listeners: Any) -> bool:
    """False where closing an old generation's listening socket can reset
    what is queued on it: the reuseport strategy without migration."""
    return not (listeners.kind == "reuseport" and getattr(listeners, "method", "") == "none")


def listener_ports(listeners: list[HeldSocket]) -> set[tuple[str, int]]:
    """(ip, port) of the TCP listeners (pure)."""
    out = set()
    for held in listeners:
        address = held.identity.address
        if address and address[0] in ("inet", "inet6"):
            out.add((str(address[1]), int(address[2])))
    return out


class Ledgers:
    """The open and recent ledgers of one supervisor.

    Args:
        broker_counts: the connection broker's cumulative counters (or an
            empty dict without one).
        lost_is_known: False when closing an old generation's listening
            socket can reset what is queued on it (reuseport, no migration).
        on_complete: called with each ledger once its generation has exited.
    """

    def __init__(
        self,
        broker_counts: Callable[[], dict[str, int]],
        lost_is_known: bool,
        on_complete: Callable[[ReloadLedger], None],
        proc: str = procfs.PROC,
    ) -> None:
        self._broker_counts = broker_counts
        self._lost_is_known = lost_is_known
        self._on_complete = on_complete
        self._proc = proc
        self.by_generation: dict[int, ReloadLedger] = {}

    def _connections(self, gen: Generation) -> set[int] | None:
        pids = [w.pid for w in gen.live_workers()]
        if not pids:
            return set()
        held = procfs.sockets_of(pids, self._proc)
        if held is None:
            return None
        ports = listener_ports(gen.listeners)
        found = sockdiag.connections({port for _ip, port in ports})
        return procfs.served_connections(held, found, ports)

    def begin(self, gen: Generation, replaced_by: int, now: float) -> ReloadLedger:
        ledger = ReloadLedger(gen.number, replaced_by, now, lost=0 if self._lost_is_known else None)
        seen = self._connections(gen)
        if seen is not None:
            ledger.seen = seen
            ledger.open_at_drain = len(seen)
        ledger.broker_at_drain = dict(self._broker_counts())
        self.by_generation[gen.number] = ledger
        while len(self.by_generation) > 64:
            self.by_generation.pop(next(iter(self.by_generation)))
        return ledger

    def stopped_accepting(self, gen: Generation) -> None:
        """Look again once ``gen`` stopped accepting: what it took meanwhile."""
        ledger = self.by_generation.get(gen.number)
        if ledger is None or ledger.open_at_drain is None:
            return
        now = self._connections(gen)
        if now is not None:
            ledger.accepted_while_draining = len(now - ledger.seen)

    def killing(self, gen: Generation) -> None:
        """``gen`` is about to be SIGKILLed: what it still holds is cut."""
        ledger = self.by_generation.get(gen.number)
        if ledger is None:
            return
        now = self._connections(gen)
        if now is not None:
            ledger.closed_by_signal += len(now)

    def exited(self, gen: Generation, now: float) -> None:
        ledger = self.by_generation.get(gen.number)
        if ledger is None or ledger.complete:
            return
        counts = self._broker_counts()
        ledger.handed_over = counts.get("placed", 0) - ledger.broker_at_drain.get("placed", 0)
        ledger.returned = counts.get("returned", 0) - ledger.broker_at_drain.get("returned", 0)
        ledger.closed_by_broker = counts.get("closed", 0) - ledger.broker_at_drain.get("closed", 0)
        # The next generation to exit counts from here: handoffs are not counted twice.
        for other in self.by_generation.values():
            if not other.complete and other is not ledger:
                other.broker_at_drain = dict(counts)
        ledger.exited = now
        ledger.seen = set()
        self._on_complete(ledger)

    def for_reload(self, old_generations: tuple[int, ...]) -> list[dict[str, Any]]:
        return [self.by_generation[n].to_dict() for n in old_generations if n in self.by_generation]
