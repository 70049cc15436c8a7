"""The ``reuseport`` strategy: fresh SO_REUSEPORT listeners for every generation.

Each generation gets its own TCP/UDP listeners, bound with SO_REUSEPORT beside
the old generation's, so socket options and the set of addresses may change on
every reload. The supervisor keeps its copy of a generation's sockets only
while that generation is starting or active (to restart crashed workers); when
the generation drains it drops them, so the sockets close with the old
workers. What happens to the connections queued on them then depends on the
migration method, chosen once at start-up (``nodrop doctor`` shows it):

* ``ebpf``: a BPF_PROG_TYPE_SK_REUSEPORT program (SELECT_OR_MIGRATE) per
  address steers every new connection to the active generation's listener,
  and the kernel migrates a closing listener's accept queue and half-open
  handshakes to it;
* ``sysctl``: ``net.ipv4.tcp_migrate_req=1`` in this network namespace (set
  only with ``--allow-sysctl``, or already on): new connections are hashed
  across old and new until the old closes; its queue then migrates;
* ``none``: the old generation's queued connections may be reset (a warning
  at start and in ``status``).

Unix sockets have no SO_REUSEPORT groups: they are held once and shared, as in
the ``inherit`` strategy.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nodrop.bind import bind_all, resolve_all
from nodrop.bpf import ReuseportSteering
from nodrop.errors import BpfError, ConfigError, NodropError
from nodrop.identity import Address
from nodrop.registry import HeldSocket
from nodrop.supervisor.config import RunConfig
from nodrop.supervisor.listeners import InheritListeners, describe
from nodrop.supervisor.steering_probe import MIGRATE_SYSCTL, choose_method

NO_MIGRATION_WARNING = (
    "no socket migration (eBPF unavailable and net.ipv4.tcp_migrate_req=0): "
    "the old generation's queued connections may be reset at each reload; "
    "run `nodrop doctor`, or use --allow-sysctl, or the inherit strategy"
)


class ReuseportListeners:
    """Per-generation SO_REUSEPORT listeners with kernel migration."""

    def __init__(
        self,
        config: RunConfig,
        inherited: Sequence[HeldSocket] = (),
        *,
        log: Callable[[str], None] = lambda _m: None,
        method: str | None = None,
    ) -> None:
        self._log = log
        self.method, reason = (method, "given") if method else choose_method(config.allow_sysctl)
        log(f"reuseport strategy: migration by {self.method} ({reason})")
        if self.method == "none":
            log(f"warning: {NO_MIGRATION_WARNING}")
        self._unix = InheritListeners(inherited)
        self._steering: dict[tuple[int, int, int, Address], ReuseportSteering] = {}
        self._ours: list[HeldSocket] = []  # reuseport sockets we still hold a copy of
        self._active: list[HeldSocket] = []

    def _steering_for(self, held: HeldSocket) -> ReuseportSteering | None:
        if self.method != "ebpf" or held.identity.type != socket.SOCK_STREAM:
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

    def prepare(self, config: RunConfig) -> list[HeldSocket]:
        targets = resolve_all(config.listen)
        inet = [t for t in targets if t.family != socket.AF_UNIX]
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
        fresh = [HeldSocket.adopt(sock, target.name) for target, sock in bound]
        try:
            for held in fresh:
                steering = self._steering_for(held)
                if steering is not None:
                    steering.attach(held.sock)
                    if steering.active_cookie() is None:
                        steering.steer_to(held.sock)  # first generation of this address
        except NodropError:
            for held in fresh:
                held.sock.close()
            self._unix.abort(shared)
            raise
        self._ours.extend(fresh)
        return fresh + shared

    def activate(self, listeners: Sequence[HeldSocket]) -> None:
        self._unix.activate(listeners)
        for held in listeners:
            if held in self._ours:
                steering = self._steering_for(held)
                if steering is not None:
                    with contextlib.suppress(BpfError):  # EBUSY: already steered there
                        steering.steer_to(held.sock)
        self._active = [h for h in listeners if h in self._ours]

    def _drop(self, listeners: Iterable[HeldSocket]) -> None:
        for held in listeners:
            if held in self._ours:
                self._ours.remove(held)
                held.sock.close()

    def abort(self, listeners: Sequence[HeldSocket]) -> None:
        self._drop(listeners)
        self._unix.abort(listeners)

    def draining(self, listeners: Sequence[HeldSocket]) -> None:
        # Drop our copies: the old workers hold the last references, and the
        # kernel migrates the queue when they close them.
        self._drop(listeners)

    def collect(self, live: Iterable[Sequence[HeldSocket]]) -> None:
        groups = list(live)
        self._unix.collect(groups)
        used = {h.identity.key for group in groups for h in group if h in self._ours}
        for key in [k for k in self._steering if k not in used]:
            self._steering.pop(key).close()

    def status(self) -> list[dict[str, Any]]:
        out = [describe(h) for h in self._active if h.sock.fileno() >= 0]
        for item in out:
            item["migration"] = self.method
        return out + self._unix.status()

    def warnings(self) -> list[str]:
        return [NO_MIGRATION_WARNING] if self.method == "none" else []

    def close(self) -> None:
        self._drop(list(self._ours))
        for steering in self._steering.values():
            steering.close()
        self._steering.clear()
        self._unix.close()


__all__ = ["MIGRATE_SYSCTL", "NO_MIGRATION_WARNING", "ReuseportListeners"]
