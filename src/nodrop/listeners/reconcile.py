"""Which listeners do I hold, which must I bind, which do I no longer need.

The bookkeeping the seed thread objected to ("the old and new process do not
necessarily listen to the same set of IP:PORTs ... it further complicates the
fd transfer logic") lives here, once: sockets are keyed by their kernel
identity, wanted listeners by the identity they will have once bound, and a
:class:`Plan` says what to keep, bind and close.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodrop.listeners.bind import BindTarget, apply_live_options, bind_all
from nodrop.listeners.identity import Address, SocketIdentity, identify
from nodrop.listeners.spec import ListenerSpec

Key = tuple[int, int, int, Address]


@dataclass(eq=False)
class HeldSocket:
    """A socket we hold, with what the kernel says it is and the name it goes by."""

    sock: socket.socket
    identity: SocketIdentity
    name: str = "unknown"
    spec: ListenerSpec | None = None
    """The spec it was bound from, if we bound it (matches port-0 specs)."""

    @classmethod
    def adopt(
        cls, sock: socket.socket, name: str = "unknown", spec: ListenerSpec | None = None
    ) -> HeldSocket:
        return cls(sock, identify(sock), name, spec)

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclass(frozen=True)
class Plan:
    """The outcome of reconciling held sockets with wanted listeners.

    Attributes:
        keep: wanted targets already held, with the socket that serves them.
        bind: wanted targets that must be bound.
        close: held sockets no wanted target matches.
    """

    keep: tuple[tuple[BindTarget, HeldSocket], ...] = ()
    bind: tuple[BindTarget, ...] = ()
    close: tuple[HeldSocket, ...] = ()


def plan(held: Iterable[HeldSocket], wanted: Sequence[BindTarget]) -> Plan:
    """Reconcile (pure: no syscalls).

    A target with port 0 ("any port") matches the socket that was bound from
    the very same spec, so an unchanged config keeps its kernel-chosen port;
    it never matches a socket bound or inherited otherwise.
    """
    held = list(held)
    by_key: dict[Key, HeldSocket] = {}
    for item in held:
        by_key.setdefault(item.identity.key, item)
    keep: list[tuple[BindTarget, HeldSocket]] = []
    to_bind: list[BindTarget] = []
    used: set[int] = set()
    for target in wanted:
        if target.wildcard_port:
            match = next(
                (
                    h
                    for h in held
                    if h.spec == target.spec
                    and id(h) not in used
                    and h.identity.family == target.family
                ),
                None,
            )
        else:
            match = by_key.get(target.key)
        if match is not None and id(match) not in used:
            used.add(id(match))
            keep.append((target, match))
        else:
            to_bind.append(target)
    close = tuple(h for h in held if id(h) not in used)
    return Plan(tuple(keep), tuple(to_bind), close)


@dataclass
class Registry:
    """The listeners a process holds, keyed by kernel identity.

    ``apply(targets)`` brings the held set to exactly ``targets``: kept sockets
    get their names and live options updated, missing ones are bound (all or
    nothing), and the ones no longer wanted are returned, not closed, so the
    caller can close them once nothing serves on them any more.
    """

    sockets: list[HeldSocket] = field(default_factory=list)

    def add(self, sock: socket.socket, name: str = "unknown") -> HeldSocket:
        held = HeldSocket.adopt(sock, name)
        self.sockets.append(held)
        return held

    def plan(self, targets: Sequence[BindTarget]) -> Plan:
        return plan(self.sockets, targets)

    def apply(self, targets: Sequence[BindTarget]) -> tuple[list[HeldSocket], list[HeldSocket]]:
        """Reconcile and act.

        Returns:
            (current, removed): the held sockets in the order of ``targets``,
            and the ones no longer wanted (still open).

        Raises:
            BindError: a new listener could not be bound; nothing changed.
        """
        the_plan = self.plan(targets)
        fresh = bind_all(the_plan.bind)
        new_by_target: dict[int, HeldSocket] = {
            id(t): HeldSocket.adopt(s, t.name, t.spec) for t, s in fresh
        }
        for target, held in the_plan.keep:
            held.name = target.name
            if held.identity.listening:
                apply_live_options(held.sock, target.options)
            new_by_target[id(target)] = held
        current = [new_by_target[id(t)] for t in targets]
        self.sockets = current
        return current, list(the_plan.close)

    def close(self) -> None:
        for held in self.sockets:
            held.sock.close()
        self.sockets = []
