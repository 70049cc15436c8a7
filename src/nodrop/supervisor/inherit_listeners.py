"""Which listening sockets each generation gets: the strategy seam.

``inherit`` (the default): the supervisor binds each listener once and passes
the *same* kernel sockets to every generation, so the listening socket never
closes and nothing queued on it is ever lost. A config change is reconciled by
kernel identity: kept listeners stay the same socket, new ones are bound
before the new generation starts, removed ones are closed once no live
generation uses them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from nodrop.listeners.bind import resolve_all
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import format_address
from nodrop.listeners.queue import accept_queue
from nodrop.listeners.reconcile import Registry
from nodrop.supervisor.config import RunConfig


class ListenerProvider(Protocol):
    """What a strategy must do for the supervisor."""

    def prepare(self, config: RunConfig) -> list[HeldSocket]:
        """Sockets for a new generation (raises BindError; nothing changes then)."""

    def activate(self, listeners: Sequence[HeldSocket]) -> None:
        """The generation that got ``listeners`` is now the active one."""

    def abort(self, listeners: Sequence[HeldSocket]) -> None:
        """The generation that got ``listeners`` failed: undo :meth:`prepare`."""

    def draining(self, listeners: Sequence[HeldSocket]) -> None:
        """The generation that got ``listeners`` has started to drain."""

    def collect(self, live: Iterable[Sequence[HeldSocket]]) -> None:
        """Close what neither the current set nor a live generation uses."""

    def status(self) -> list[dict[str, Any]]: ...

    def warnings(self) -> list[str]: ...

    def close(self) -> None: ...

    kind: str
    """The strategy's name, as a re-exec state records it."""

    def export_state(self) -> tuple[dict[str, Any], list[HeldSocket], list[int]]:
        """For ``nodrop reexec``: the strategy's state, every socket it holds
        (the state refers to them by index) and any other fds to keep open."""


def describe(held: HeldSocket) -> dict[str, Any]:
    ident = held.identity
    open_ = held.sock.fileno() >= 0
    queue = accept_queue(held.sock) if open_ else None
    return {
        "name": held.name,
        # The kernel socket's inode: the same number means the same socket
        # (as /proc/PID/fd shows it: socket:[INODE]).
        "inode": os.fstat(held.sock.fileno()).st_ino if open_ else None,
        "address": format_address(ident.address),
        "identity": str(ident),
        "accept_queue": None if queue is None else queue[0],
        "backlog": None if queue is None else queue[1],
    }


class InheritListeners:
    """One set of sockets, held by the supervisor for its whole life."""

    kind = "inherit"

    def __init__(self, inherited: Sequence[HeldSocket] = ()) -> None:
        # Sockets from our own service manager (systemd socket activation)
        # are its, not ours to close: always kept and passed on.
        self._inherited = list(inherited)
        self._registry = Registry(list(inherited))
        self._previous: list[HeldSocket] | None = None
        self._held: list[HeldSocket] = list(inherited)  # everything we may have to close

    def take(self, held: Sequence[HeldSocket]) -> None:
        """Sockets taken from a killed supervisor's workers (:mod:`.takeover`):
        held from now on, and reused by the next :meth:`prepare` for every
        listener they match."""
        self._registry.sockets.extend(held)
        self._held.extend(held)

    @property
    def current(self) -> list[HeldSocket]:
        return list(self._registry.sockets)

    def prepare(self, config: RunConfig) -> list[HeldSocket]:
        targets = resolve_all(config.listen)
        before = list(self._registry.sockets)
        current, _removed = self._registry.apply(targets)
        for held in self._inherited:
            if held not in current:
                current.append(held)
        self._registry.sockets = current
        self._previous = before
        self._held.extend(h for h in current if h not in self._held)
        return list(current)

    def activate(self, listeners: Sequence[HeldSocket]) -> None:
        self._previous = None

    def abort(self, listeners: Sequence[HeldSocket]) -> None:
        if self._previous is not None:
            self._registry.sockets = self._previous
            self._previous = None

    def draining(self, listeners: Sequence[HeldSocket]) -> None:
        pass

    def collect(self, live: Iterable[Sequence[HeldSocket]]) -> None:
        keep = {id(h) for h in self._registry.sockets}
        for group in live:
            keep.update(id(h) for h in group)
        for held in list(self._held):
            if id(held) not in keep:
                held.close()
                self._held.remove(held)

    def status(self) -> list[dict[str, Any]]:
        return [describe(h) for h in self._registry.sockets]

    def warnings(self) -> list[str]:
        return []

    def close(self) -> None:
        for held in self._held:
            held.close()
        self._held = []
        self._registry.sockets = []

    # -- across `nodrop reexec` ------------------------------------------------
    def export_state(self) -> tuple[dict[str, Any], list[HeldSocket], list[int]]:
        """What a re-executed supervisor needs: every held socket (by index
        into the returned list) and which are current and inherited."""
        held = list(self._held)
        index = {id(h): i for i, h in enumerate(held)}
        state = {
            "current": [index[id(h)] for h in self._registry.sockets],
            "inherited": [index[id(h)] for h in self._inherited if id(h) in index],
        }
        return state, held, []

    @classmethod
    def from_state(cls, state: dict[str, Any], held: list[HeldSocket]) -> InheritListeners:
        inherited = [held[i] for i in state["inherited"]]
        self = cls(inherited)
        self._held = list(held)
        self._registry.sockets = [held[i] for i in state["current"]]
        return self
