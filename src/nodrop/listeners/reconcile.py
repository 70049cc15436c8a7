"""Which listeners do I hold, which must I bind, which do I no longer need.

The bookkeeping the seed thread objected to ("the old and new process do not
necessarily listen to the same set of IP:PORTs ... it further complicates the
fd transfer logic") lives here, once: sockets are keyed by their kernel
identity, wanted listeners by the identity they will have once bound, and a
:class:`Plan` says what to keep, bind and close.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodrop.listeners.bind import BindTarget, apply_live_options, bind_all
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import Address

Key = tuple[int, int, int, Address]


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


def serves_port_zero(held: HeldSocket, target: BindTarget) -> bool:
    """The one port-0 rule: may ``held`` serve the port-0 ``target`` (pure)?

    Port 0 asks for "any port" once; afterwards it means "the port I already
    have". A held socket serves a port-0 target when both are the same
    transport (family, type, protocol) on the same host under the same name,
    and the socket was not bound for an explicit port. Options (backlog...)
    may differ: changing them must not move the port. Inherited sockets carry
    no spec; their name (``LISTEN_FDNAMES``) decides.
    """
    family, type_, protocol, address = held.identity.key
    return (
        target.wildcard_port
        and (family, type_, protocol) == (target.family, target.type, target.protocol)
        and address[1] == target.address[1]
        and held.name == target.name
        and (held.spec is None or held.spec.port == 0)
    )


def pin_wildcard_ports(
    targets: Sequence[BindTarget], held: Iterable[HeldSocket]
) -> list[BindTarget]:
    """Give each port-0 target the port of the held socket that serves it
    (:func:`serves_port_zero`; each socket serves one target). A target with
    no match keeps port 0, and the kernel picks one when it is bound (pure)."""
    candidates = list(held)
    used: set[int] = set()
    out: list[BindTarget] = []
    for target in targets:
        match = next(
            (h for h in candidates if id(h) not in used and serves_port_zero(h, target)), None
        )
        if match is not None:
            used.add(id(match))
            port = int(match.identity.address[2])
            target = dataclasses.replace(
                target, sockaddr=(target.sockaddr[0], port, *target.sockaddr[2:])
            )
        out.append(target)
    return out


def plan(held: Iterable[HeldSocket], wanted: Sequence[BindTarget]) -> Plan:
    """Reconcile (pure: no syscalls).

    Port-0 targets are pinned first (:func:`pin_wildcard_ports`); then every
    target is matched by the kernel identity its socket will have. A port-0
    target nothing serves is bound afresh.
    """
    held = list(held)
    by_key: dict[Key, HeldSocket] = {}
    for item in held:
        by_key.setdefault(item.identity.key, item)
    keep: list[tuple[BindTarget, HeldSocket]] = []
    to_bind: list[BindTarget] = []
    used: set[int] = set()
    for target in pin_wildcard_ports(wanted, held):
        match = None if target.wildcard_port else by_key.get(target.key)
        if match is not None and id(match) not in used:
            used.add(id(match))
            keep.append((target, match))
        else:
            to_bind.append(target)
    close = tuple(h for h in held if id(h) not in used)
    return Plan(tuple(keep), tuple(to_bind), close)


def acquire(targets: Sequence[BindTarget], held: Sequence[HeldSocket]) -> list[HeldSocket]:
    """The listeners for ``targets``, starting from the sockets in ``held``
    (claimed from a holder, inherited, received): matches are kept, the rest
    bound; held sockets no target wants are closed.

    Returns:
        One socket per target, in the order of ``targets``, named after it.

    Raises:
        BindError: a missing listener could not be bound; every socket in
            ``held`` is closed (nothing half-acquired stays open).
    """
    registry = Registry(list(held))
    try:
        current, removed = registry.apply(targets)
    except BaseException:
        registry.close()
        raise
    for item in removed:
        item.close()
    return current


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
        targets = pin_wildcard_ports(targets, self.sockets)
        the_plan = self.plan(targets)
        fresh = bind_all(the_plan.bind)
        new_by_target: dict[int, HeldSocket] = {
            id(t): HeldSocket.bound(s, t.name, t.spec) for t, s in fresh
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
            held.close()
        self.sockets = []
