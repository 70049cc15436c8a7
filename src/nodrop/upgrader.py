"""Self-upgrade for a Python server without a supervisor (tableflip's use case).

One :class:`Upgrader` per process. The old generation starts the new one
(same argv by default) with one end of a ``SOCK_SEQPACKET`` channel at an
inherited fd named by ``NODROP_UPGRADE_FD``, hands it every listener over the
handoff protocol, and waits for its ``ready``. Only then does ``upgrade()``
report success, and the caller drains and exits; if the new generation
exits, fails the handoff or is not ready in time, it is killed and reaped,
and the old one keeps serving with the reason in hand.

Listeners come, in order of preference, from the predecessor, from a holder
(``nodrop hold``), from ``LISTEN_FDS``, or are bound fresh; they are matched
to the wanted specs by kernel identity. A listener the new generation no
longer wants is closed in the new generation at once: the old generation
still holds its own copy and keeps accepting on it until it drains, so the
kernel socket closes only after the old one stopped accepting.

State machine (single-flight, explicit refusals)::

    STARTING --ready()--> READY --upgrade()--> UPGRADING --ok--> UPGRADED
                            ^                      |
                            +------- failed -------+
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from nodrop.errors import NodropError, ProtocolError, UpgradeError
from nodrop.fdwire import Channel, channel_pair
from nodrop.holder import client as holder_client
from nodrop.listeners.bind import BindTarget, resolve_all
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.reconcile import acquire
from nodrop.listeners.spec import format_spec, parse_spec
from nodrop.systemd.activation import listen_fds
from nodrop.systemd.notify import notify

ENV_FD = "NODROP_UPGRADE_FD"
"""The variable naming the inherited channel fd of a new generation."""
DEFAULT_UPGRADE_TIMEOUT = 30.0
"""Seconds a new generation has to take its sockets and call ready()."""
DEFAULT_ACK_TIMEOUT = 10.0
"""Seconds ready() waits for the old generation to acknowledge."""

log = logging.getLogger(__name__)
"""Where a listener bound afresh instead of claimed is reported (a warning:
with logging unconfigured, one line on stderr)."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UPGRADING = "upgrading"
    UPGRADED = "upgraded"
    CLOSED = "closed"


@dataclass(frozen=True)
class UpgradeResult:
    """The outcome of one :meth:`Upgrader.upgrade`.

    Attributes:
        ok: the new generation is ready; drain and exit.
        pid: the new generation's pid (None if it never started).
        reason: why not, when not ok.
        exit_status: the new generation's exit status if it exited.
        seconds: how long the upgrade took.
    """

    ok: bool
    pid: int | None
    reason: str = ""
    exit_status: int | None = None
    seconds: float = 0.0


class Upgrader:
    """Listeners that survive self-upgrades.

    Example (threaded)::

        up = Upgrader(listen=["tcp://127.0.0.1:8000?name=web"])
        web = up.listeners()["web"]
        ... start serving on web ...
        up.ready()
        up.install_sighup(lambda result: stop_and_drain() if result.ok else log(result))

    Args:
        listen: wanted listener specs (``nodrop.parse_spec`` syntax). Empty:
            keep whatever was inherited, bind nothing.
        holder: a ``nodrop hold`` path to claim from when there is no
            predecessor, and to :meth:`park` in.
        environ: the environment (``os.environ`` by default); the upgrade and
            activation variables are removed from it once read.
    """

    def __init__(
        self,
        listen: Sequence[str] = (),
        *,
        holder: str | None = None,
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        self.specs = [parse_spec(text) for text in listen]
        self.holder = holder
        self.environ = os.environ if environ is None else environ
        self.generation = 1
        self.state = State.STARTING
        self.upgraded = threading.Event()
        """Set when an upgrade succeeded: time to drain and exit."""
        self._lock = threading.Lock()
        self._sockets: list[HeldSocket] | None = None
        self._keys: list[str] = []
        self._predecessor: Channel | None = None
        self._successor: Channel | None = None
        self._successor_proc: subprocess.Popen[bytes] | None = None

    # -- obtaining listeners ------------------------------------------------------
    @property
    def has_predecessor(self) -> bool:
        """True when this process was started by an older generation's upgrade()."""
        return self._predecessor is not None

    def listeners(self) -> dict[str, socket.socket]:
        """The listeners, by name (a spec without ``name=`` is keyed by its text;
        a name that resolves to several addresses gets ``name#2``, ...).

        The first call obtains them: from the predecessor, else a holder, else
        ``LISTEN_FDS``; then binds whatever is wanted and missing.

        Raises:
            ProtocolError: the predecessor's handoff failed.
            HolderError: the holder refused.
            BindError: a missing listener could not be bound.
        """
        if self._sockets is None:
            self._obtain()
        assert self._sockets is not None
        return {key: held.sock for key, held in zip(self._keys, self._sockets, strict=True)}

    def sockets(self) -> list[HeldSocket]:
        """The listeners with their kernel identity, in spec order."""
        if self._sockets is None:
            self._obtain()
        assert self._sockets is not None
        return list(self._sockets)

    def _obtain(self) -> None:
        """Where the listeners come from, in order: the predecessor's channel,
        the holder, ``LISTEN_FDS``; then :func:`~nodrop.listeners.reconcile.acquire`
        keeps what matches the specs and binds the rest."""
        targets = resolve_all(self.specs) if self.specs else []
        raw = self.environ.pop(ENV_FD, None)
        held: list[HeldSocket] = []
        from_holder = False
        if raw is not None:
            held = self._from_predecessor(raw)
        elif self.holder is not None and targets:
            held = holder_client.claim_matching(self.holder, targets)
            from_holder = True
        if not held:
            held = [HeldSocket.adopt(s.socket, s.name) for s in listen_fds(environ=self.environ)]
        if from_holder:
            assert self.holder is not None
            # The holder's TTL is a hard deadline: a successor that claims too
            # late gets a new socket, and the clients queued on the parked one
            # were reset. Say so, or it looks like a clean handover.
            for target in holder_client.unclaimed(targets, held):
                log.warning(holder_client.fresh_bind_note(target, self.holder))
        current = acquire(targets, held) if targets else held
        self._sockets = current
        self._keys = _keys(current, targets)

    def _from_predecessor(self, raw: str) -> list[HeldSocket]:
        try:
            fd = int(raw)
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            channel = Channel(socket.socket(fileno=fd), timeout=DEFAULT_ACK_TIMEOUT)
        except (ValueError, OSError) as exc:
            raise ProtocolError(f"{ENV_FD}={raw!r} is not an inherited channel") from exc
        self._predecessor = channel
        transfer = channel.take()
        generation = transfer.meta.get("generation")
        if isinstance(generation, int):
            self.generation = generation + 1
        return [HeldSocket.adopt(item.socket(), item.name) for item in transfer.sockets]

    # -- readiness ------------------------------------------------------------------
    def ready(self) -> None:
        """We serve: tell the predecessor (which then drains and exits) and the
        service manager (``READY=1``, ``MAINPID=``) if there is one.

        Raises:
            UpgradeError: called twice, or after close().
        """
        with self._lock:
            if self.state is not State.STARTING:
                raise UpgradeError(f"ready() called in state {self.state.value}")
            if self._sockets is None:
                self._obtain()
            self.state = State.READY
        if self._predecessor is not None:
            # If it gave up on us or is gone, we serve either way.
            with contextlib.suppress(OSError, NodropError):
                self._predecessor.request({"op": "ready", "pid": os.getpid()})
        with contextlib.suppress(NodropError):
            notify({"READY": "1", "MAINPID": str(os.getpid())}, environ=self.environ)

    def wait_predecessor(self, timeout: float) -> bool:
        """Wait until the old generation has exited (its end of the channel
        closed). True if it did within ``timeout`` or there is none."""
        channel = self._predecessor
        if channel is None:
            return True
        channel.sock.settimeout(timeout)
        try:
            while True:
                try:
                    channel.recv()
                except ProtocolError:
                    return True  # EOF (or garbage): it is gone
        except (TimeoutError, OSError):
            return False

    # -- upgrading --------------------------------------------------------------------
    def upgrade(
        self,
        argv: Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_UPGRADE_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> UpgradeResult:
        """Start the new generation, hand it our listeners, wait for its ready().

        Args:
            argv: the command (default: how this process was started).
            timeout: seconds it has to become ready; then it is killed.
            env: its environment (default: ours).

        Returns:
            ``ok`` True: drain and exit (``self.upgraded`` is set). False: we
            keep serving; ``reason`` says why.

        Raises:
            UpgradeError: refused — not ready yet, an upgrade is in progress,
                or one already succeeded.
        """
        with self._lock:
            if self.state is State.UPGRADING:
                raise UpgradeError("an upgrade is already in progress")
            if self.state is State.UPGRADED:
                raise UpgradeError("already upgraded; this generation is draining")
            if self.state is not State.READY:
                raise UpgradeError(f"not ready (state {self.state.value}); call ready() first")
            self.state = State.UPGRADING
        result = UpgradeResult(False, None, "internal error")
        try:
            result = self._run_upgrade(argv, timeout, env)
        finally:
            with self._lock:
                self.state = State.UPGRADED if result.ok else State.READY
            if result.ok:
                self.upgraded.set()
        return result

    def _run_upgrade(
        self, argv: Sequence[str] | None, timeout: float, env: Mapping[str, str] | None
    ) -> UpgradeResult:
        start = time.monotonic()
        deadline = start + timeout
        command = list(argv) if argv is not None else default_argv()
        ours, theirs = channel_pair()
        child_env = dict(self.environ if env is None else env)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            child_env.pop(var, None)
        child_env[ENV_FD] = str(theirs.fileno())
        try:
            proc = subprocess.Popen(command, env=child_env, pass_fds=[theirs.fileno()])
        except OSError as exc:
            ours.close()
            theirs.close()
            return UpgradeResult(False, None, f"cannot start {command[0]}: {exc.strerror}")
        finally:
            theirs.close()

        def fail(reason: str) -> UpgradeResult:
            ours.close()
            status = _stop(proc)
            return UpgradeResult(False, proc.pid, reason, status, time.monotonic() - start)

        try:
            ours.sock.settimeout(max(0.01, deadline - time.monotonic()))
            ours.give(self.sockets(), meta={"generation": self.generation, "pid": os.getpid()})
            ours.sock.settimeout(max(0.01, deadline - time.monotonic()))
            header, _ = ours.recv()
            if header["op"] != "ready":
                return fail(f"new generation said {header['op']!r}, not ready")
            ours.reply_ok()
        except TimeoutError:
            return fail(f"new generation not ready within {timeout:g}s; killed")
        except (ProtocolError, OSError) as exc:
            # EOF or a reset: most often the new generation died; say so.
            status = proc.poll()
            if status is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    status = proc.wait(1.0)
            if status is not None:
                return fail(f"new generation exited with status {status} before ready")
            return fail(f"handoff failed: {exc}")
        self._successor, self._successor_proc = ours, proc
        return UpgradeResult(True, proc.pid, "", None, time.monotonic() - start)

    async def upgrade_async(
        self,
        argv: Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_UPGRADE_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> UpgradeResult:
        """:meth:`upgrade` for asyncio (runs in a worker thread)."""
        return await asyncio.to_thread(self.upgrade, argv, timeout=timeout, env=env)

    def install_sighup(
        self,
        on_result: Callable[[UpgradeResult], object],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        argv: Sequence[str] | None = None,
        timeout: float = DEFAULT_UPGRADE_TIMEOUT,
    ) -> None:
        """Upgrade on SIGHUP and pass the result to ``on_result``.

        With ``loop``, the handler is the loop's (``add_signal_handler``) and
        the upgrade runs as a task; otherwise a ``signal.signal`` handler
        starts the upgrade in a thread. A refused upgrade (a second SIGHUP
        while one runs) reaches ``on_result`` as a failed result. Call from
        the main thread.
        """

        def run() -> None:
            on_result(self._guarded(argv, timeout))

        if loop is not None:

            async def run_async() -> None:
                try:
                    result = await self.upgrade_async(argv, timeout=timeout)
                except UpgradeError as exc:
                    result = UpgradeResult(False, None, str(exc))
                on_result(result)

            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(run_async()))
            return
        signal.signal(
            signal.SIGHUP,
            lambda *_: threading.Thread(target=run, name="nodrop-upgrade", daemon=True).start(),
        )

    def _guarded(self, argv: Sequence[str] | None, timeout: float) -> UpgradeResult:
        try:
            return self.upgrade(argv, timeout=timeout)
        except UpgradeError as exc:
            return UpgradeResult(False, None, str(exc))

    # -- holder ------------------------------------------------------------------------
    def park(self, ttl: float | None = None, *, spawn: bool = False) -> holder_client.DepositResult:
        """Deposit our listeners in the holder before exiting (stop-then-start).

        Our copies stay open; close them (or exit) once we stopped accepting.

        Raises:
            UpgradeError: no holder was configured.
            HolderError: the holder refused.
        """
        if self.holder is None:
            raise UpgradeError("park() needs Upgrader(holder=PATH)")
        return holder_client.deposit(self.holder, self.sockets(), ttl=ttl, spawn=spawn)

    def close(self) -> None:
        """Close our listener copies and channels (the kernel sockets live on in
        whoever else holds them)."""
        with self._lock:
            self.state = State.CLOSED
        for held in self._sockets or []:
            held.sock.close()
        self._sockets = []
        self._keys = []
        for channel in (self._predecessor, self._successor):
            if channel is not None:
                channel.close()
        self._predecessor = self._successor = None


def default_argv() -> list[str]:
    """How this process was started: the interpreter and its original arguments."""
    return [sys.executable, *sys.orig_argv[1:]]


def _keys(current: Sequence[HeldSocket], targets: Sequence[BindTarget]) -> list[str]:
    keys: list[str] = []
    seen: dict[str, int] = {}
    for i, held in enumerate(current):
        if targets:
            spec = targets[i].spec
            base = spec.options.name or spec.text or format_spec(spec)
        else:
            base = held.name
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """Kill a failed new generation (if still running) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        return proc.wait(10.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        return -1
