"""The ``reuseport`` strategy: fresh SO_REUSEPORT listeners for every generation.

Each generation gets its own TCP/UDP listeners, bound with SO_REUSEPORT beside
the old generation's, so socket options and the set of addresses may change on
every reload. The supervisor keeps its copy of a generation's sockets only
while that generation is starting or active (to restart crashed workers); when
the generation drains it drops them, so the sockets close with the old
workers. What happens to the connections queued on them then depends on the
migration method, chosen once at start-up (``nodrop doctor`` shows it;
``NODROP_MIGRATION`` forces it, see :mod:`nodrop.kernel.migration`):

* ``ebpf``: a BPF_PROG_TYPE_SK_REUSEPORT program (SELECT_OR_MIGRATE) per
  address steers every new connection to the active generation's listener,
  and the kernel migrates a closing listener's accept queue and half-open
  handshakes to it;
* ``sysctl``: ``net.ipv4.tcp_migrate_req=1`` in this network namespace (set
  only with ``--allow-sysctl``, or already on): new connections are hashed
  across old and new until the old closes; its queue then migrates;
* ``none``: the old generation's queued connections may be reset (a warning
  at start and in ``status``).

A port-0 spec (``tcp://127.0.0.1:0``) keeps the port the kernel gave the
first generation: later generations bind that port, in the same group.

UDP listeners join SO_REUSEPORT groups too. With ``ebpf`` the same program
steers new datagrams to the active generation's socket (a sockarray accepts
bound UDP sockets); nothing migrates for UDP, so datagrams still unread in the
old generation's receive buffer when it closes are lost -- a draining server
should read its UDP sockets until empty before exiting. Without eBPF the
kernel hashes datagrams across both generations until the old one closes.

Unix sockets have no SO_REUSEPORT groups: they are held once and shared, as in
the ``inherit`` strategy.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nodrop.errors import BpfError, ConfigError, NodropError
from nodrop.kernel.bpf import ReuseportSteering, socket_cookie
from nodrop.kernel.migration import FORCE_ENV, MIGRATE_SYSCTL, choose_method
from nodrop.listeners.bind import bind_all, resolve_all
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import Address
from nodrop.listeners.reconcile import pin_wildcard_ports
from nodrop.supervisor.config import RunConfig
from nodrop.supervisor.inherit_listeners import InheritListeners, describe

NO_MIGRATION_WARNING = (
    "no socket migration (eBPF unavailable and net.ipv4.tcp_migrate_req=0): "
    "the old generation's queued connections may be reset at each reload; "
    "run `nodrop doctor`, or use --allow-sysctl, or the inherit strategy"
)

Key = tuple[int, int, int, Address]


class ReuseportListeners:
    """Per-generation SO_REUSEPORT listeners with kernel migration.

    Args:
        config: the first generation's config (for ``allow_sysctl``).
        inherited: sockets from our own service manager, passed on as is.
        log: where start-up decisions are written.
        method: force ``ebpf``, ``sysctl`` or ``none`` (default: the
            environment's ``NODROP_MIGRATION``, else :func:`choose_method`).

    Raises:
        ConfigError: a forced method is unavailable.
    """

    kind = "reuseport"

    def __init__(
        self,
        config: RunConfig,
        inherited: Sequence[HeldSocket] = (),
        *,
        log: Callable[[str], None] = lambda _m: None,
        method: str | None = None,
    ) -> None:
        self._log = log
        self.method, self.reason = (
            (method, "given") if method else choose_method(config.allow_sysctl)
        )
        log(f"reuseport strategy: migration by {self.method} ({self.reason})")
        if self.method == "none":
            log(f"warning: {NO_MIGRATION_WARNING}")
        self._unix = InheritListeners(inherited)
        self._steering: dict[Key, ReuseportSteering] = {}
        self._ours: list[HeldSocket] = []  # reuseport sockets we still hold a copy of
        self._taken: list[HeldSocket] = []  # from a killed supervisor's workers, until prepare
        self._active: list[HeldSocket] = []
        self._warnings: list[str] = []

    # -- steering ---------------------------------------------------------------
    def _steering_for(self, held: HeldSocket) -> ReuseportSteering | None:
        if self.method != "ebpf":
            return None
        key = held.identity.key
        steering = self._steering.get(key)
        if steering is None:
            try:
                steering = ReuseportSteering()
            except BpfError as exc:
                raise ConfigError(f"cannot load the eBPF steering program: {exc}") from exc
            self._steering[key] = steering
        return steering

    def _steer(self, held: HeldSocket, *, first_only: bool) -> None:
        """Attach (on first use) and, unless ``first_only`` finds the slot
        taken, point the address's steering at ``held``."""
        steering = self._steering_for(held)
        if steering is None:
            return
        try:
            if first_only:
                # Attaching again through a socket of the same group replaces
                # the group's program by the same one: harmless, and it makes
                # sure a group re-created after every socket closed has it.
                steering.attach(held.sock)
                if steering.active_cookie() is not None:
                    return  # the active generation owns this address
            elif steering.active_cookie() == socket_cookie(held.sock):
                return
            steering.steer_to(held.sock)
        except BpfError as exc:
            if held.identity.type == socket.SOCK_STREAM or exc.errno == errno.EBADF:
                raise
            # UDP steering is a bonus (nothing migrates for UDP): say so, go on.
            self._note(f"no eBPF steering for {describe(held)['identity']}: {exc}")

    def _note(self, message: str) -> None:
        if message not in self._warnings:
            self._warnings.append(message)
            self._log(f"warning: {message}")

    def take(self, held: Sequence[HeldSocket]) -> None:
        """Sockets taken from a killed supervisor's workers (:mod:`.takeover`):
        the next :meth:`prepare` binds beside them (port-0 specs get their
        ports), then lets go of them -- the orphans' own copies keep them
        until they close, and the kernel migrates their queues then."""
        self._taken = [h for h in held if h.identity.family != socket.AF_UNIX]
        self._active = list(self._taken)
        for extra in held:
            if extra not in self._taken:
                extra.sock.close()

    # -- ListenerProvider -------------------------------------------------------
    def prepare(self, config: RunConfig) -> list[HeldSocket]:
        targets = resolve_all(config.listen)
        inet = pin_wildcard_ports([t for t in targets if t.family != socket.AF_UNIX], self._active)
        taken, self._taken = self._taken, []
        for held in taken:
            held.sock.close()
        unix_config = RunConfig(
            command=config.command,
            listen=tuple(t.spec for t in targets if t.family == socket.AF_UNIX),
        )
        shared = self._unix.prepare(unix_config)
        try:
            bound = bind_all(inet, reuseport=True)
        except NodropError:
            self._unix.abort(shared)
            raise
        fresh = [HeldSocket.adopt(sock, target.name, target.spec) for target, sock in bound]
        try:
            for held in fresh:
                # A first generation (or a new address) is steered to at once:
                # nobody else serves there. Otherwise the active generation
                # keeps every new connection until this one is ready.
                self._steer(held, first_only=True)
        except NodropError:
            for held in fresh:
                held.sock.close()
            self._unix.abort(shared)
            raise
        self._ours.extend(fresh)
        return fresh + shared

    def activate(self, listeners: Sequence[HeldSocket]) -> None:
        self._unix.activate(listeners)
        mine = [h for h in listeners if h in self._ours]
        for held in mine:
            self._steer(held, first_only=False)
        self._active = mine

    def _drop(self, listeners: Iterable[HeldSocket]) -> None:
        for held in listeners:
            if held in self._ours:
                self._ours.remove(held)
                held.sock.close()

    def abort(self, listeners: Sequence[HeldSocket]) -> None:
        # The failed generation's workers may still hold its sockets while
        # they drain; steering never pointed at them for an address the
        # active generation serves, so nothing new reaches them.
        self._drop(listeners)
        self._unix.abort(listeners)

    def draining(self, listeners: Sequence[HeldSocket]) -> None:
        # Drop our copies: the old workers hold the last references, and the
        # kernel migrates the queue when they close them.
        self._drop(listeners)

    def collect(self, live: Iterable[Sequence[HeldSocket]]) -> None:
        groups = list(live)
        self._unix.collect(groups)
        # Keep an address's steering while any live generation (draining
        # ones included: their workers still hold the sockets) is on it.
        used = {h.identity.key for group in groups for h in group}
        for key in [k for k in self._steering if k not in used]:
            self._steering.pop(key).close()

    def status(self) -> list[dict[str, Any]]:
        out = []
        for held in self._active:
            if held.sock.fileno() < 0:
                continue
            item = describe(held)
            item["migration"] = self.method
            steering = self._steering.get(held.identity.key)
            item["steered"] = steering is not None and steering.active_cookie() == socket_cookie(
                held.sock
            )
            out.append(item)
        return out + self._unix.status()

    def warnings(self) -> list[str]:
        base = [NO_MIGRATION_WARNING] if self.method == "none" else []
        return base + list(self._warnings)

    def close(self) -> None:
        self._drop(list(self._ours))
        for steering in self._steering.values():
            steering.close()
        self._steering.clear()
        self._unix.close()

    # -- across `nodrop reexec` ------------------------------------------------
    def export_state(self) -> tuple[dict[str, Any], list[HeldSocket], list[int]]:
        """State, held sockets (shared ones first, then our per-generation
        copies) and the extra fds to keep (each steering's map and program)."""
        unix_state, shared, _ = self._unix.export_state()
        held = shared + [h for h in self._ours if h not in shared]
        index = {id(h): i for i, h in enumerate(held)}
        steering = [[[*list(key[:3]), list(key[3])], *st.fds] for key, st in self._steering.items()]
        state = {
            "method": self.method,
            "reason": self.reason,
            "unix": unix_state,
            "shared": len(shared),
            "ours": [index[id(h)] for h in self._ours],
            "active": [index[id(h)] for h in self._active if id(h) in index],
            "steering": steering,
            "warnings": list(self._warnings),
        }
        return state, held, [fd for st in self._steering.values() for fd in st.fds]

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        held: list[HeldSocket],
        *,
        log: Callable[[str], None] = lambda _m: None,
    ) -> ReuseportListeners:
        """Rebuild from :meth:`export_state` without probing again (the map
        and program fds are adopted; close-on-exec is the caller's)."""
        self = cls.__new__(cls)
        self._log = log
        self.method, self.reason = state["method"], state["reason"]
        self._unix = InheritListeners.from_state(state["unix"], held[: state["shared"]])
        self._ours = [held[i] for i in state["ours"]]
        self._taken = []
        self._active = [held[i] for i in state["active"]]
        self._warnings = list(state["warnings"])
        self._steering = {}
        for key_wire, map_fd, prog_fd in state["steering"]:
            family, type_, proto, address = key_wire
            key: Key = (family, type_, proto, tuple(address))
            self._steering[key] = ReuseportSteering.adopt_fds(map_fd, prog_fd)
        return self


__all__ = [
    "FORCE_ENV",
    "MIGRATE_SYSCTL",
    "NO_MIGRATION_WARNING",
    "ReuseportListeners",
]
