"""Talking to a holder: deposit, claim, list, release; start one on demand.

Each call opens one connection, makes one request and closes it. Every
call has a deadline (``timeout``). A holder that refuses (wrong uid, bad
request, too many sockets) raises :class:`~nodrop.errors.HolderError` with
its reason; nothing is lost on either side: a failed deposit leaves the
caller's sockets open, a failed claim leaves the holder's held.

Started on demand: ``deposit(..., spawn=True)`` starts ``nodrop hold
--exit-when-empty`` (detached, in a session of its own) when nothing listens
at the path, waits for its ``READY=1`` over a private notify socket, and
deposits. Such a holder exits by itself once everything it held has been
claimed, released or has expired.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodrop.errors import HolderError, NodropError, ProtocolError
from nodrop.fdwire import DEFAULT_TIMEOUT, Channel
from nodrop.fdwire import connect as handoff_connect
from nodrop.holder.ops import Key, key_to_wire
from nodrop.listeners.bind import BindTarget
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import SocketIdentity, identify
from nodrop.listeners.reconcile import acquire
from nodrop.listeners.spec import format_spec
from nodrop.systemd.receiver import NotifyReceiver

SPAWN_TIMEOUT = 10.0
"""Seconds an on-demand holder has to report READY=1."""

# The intermediate process of a double fork: it starts the holder in a new
# session and exits at once, so the holder is nobody's zombie-to-be.
_DETACH = (
    "import subprocess,sys;subprocess.Popen(sys.argv[1:],start_new_session=True,close_fds=True)"
)


@dataclass(frozen=True)
class DepositResult:
    """What the holder says it now holds for us.

    Attributes:
        ids: holder-assigned ids, in the order deposited (a socket it already
            held keeps its id).
        ttl: seconds the sockets are held.
        spawned_pid: the pid of a holder started by this call, else None.
    """

    ids: list[int]
    ttl: float
    spawned_pid: int | None = None


@dataclass
class ClaimResult:
    """Sockets claimed from a holder (ours now), and names asked for but not held."""

    sockets: list[HeldSocket] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def close(self) -> None:
        for held in self.sockets:
            held.sock.close()
        self.sockets = []


@dataclass(frozen=True)
class ParkedInfo:
    """One socket a holder keeps, as ``list`` reports it."""

    id: int
    name: str
    identity: SocketIdentity
    inode: int
    expires_in: float
    depositor_pid: int
    depositor_uid: int
    via: str


def connect(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Open a connection to the holder at ``path``.

    Raises:
        HolderError: nothing listens there, or we may not connect.
    """
    try:
        return handoff_connect(path, timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise HolderError(f"no holder listens at {path}") from exc
    except OSError as exc:
        raise HolderError(f"cannot connect to the holder at {path}: {exc.strerror}") from exc


def _call(channel: Channel, header: dict[str, Any]) -> dict[str, Any]:
    """Send a request and read the reply; a refusal raises HolderError."""
    try:
        channel.send(header)
    except OSError as exc:
        _raise_refusal(channel, exc)
    try:
        return channel.expect_ok()
    except (ProtocolError, OSError) as exc:
        raise HolderError(f"holder: {exc}") from exc


def _raise_refusal(channel: Channel, exc: OSError) -> None:
    """The holder closed on us; it usually said why first (a denied uid)."""
    try:
        header, _ = channel.recv()
    except (OSError, NodropError):
        raise HolderError(f"holder closed the connection: {exc}") from exc
    raise HolderError(f"holder refused: {header.get('message', header.get('op'))}") from exc


def _passables(
    sockets: Mapping[str, socket.socket] | Iterable[HeldSocket | tuple[str, socket.socket]],
) -> list[HeldSocket]:
    items: Iterable[Any] = sockets.items() if isinstance(sockets, Mapping) else sockets
    out: list[HeldSocket] = []
    for item in items:
        if isinstance(item, HeldSocket):
            out.append(item)
        else:
            name, sock = item
            out.append(HeldSocket(sock, identify(sock), name))
    return out


def deposit(
    path: str,
    sockets: Mapping[str, socket.socket] | Iterable[HeldSocket | tuple[str, socket.socket]],
    *,
    ttl: float | None = None,
    spawn: bool = False,
    spawn_args: Sequence[str] = (),
    log_path: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> DepositResult:
    """Park sockets in the holder at ``path``; our copies stay open (close them
    when you are done serving).

    Args:
        path: the holder's socket.
        sockets: name -> socket, or (name, socket) pairs, or HeldSockets.
        ttl: seconds to hold them (None: the holder's default).
        spawn: start an on-demand holder if none listens at ``path``.
        spawn_args: extra ``nodrop hold`` options for a spawned holder.
        log_path: where a spawned holder logs (default: our stderr).
        timeout: deadline of each step.

    Raises:
        HolderError: no holder (and ``spawn`` is False), or it refused.
    """
    items = _passables(sockets)
    spawned: int | None = None
    try:
        channel = connect(path, timeout=timeout)
    except HolderError:
        if not spawn:
            raise
        spawned = (
            spawn_holder(path, args=spawn_args, log_path=log_path, timeout=SPAWN_TIMEOUT) or None
        )
        channel = connect(path, timeout=timeout)
    with channel:
        header: dict[str, Any] = {"op": "deposit"}
        if ttl is not None:
            header["ttl"] = ttl
        try:
            channel.send(header)
        except OSError as exc:
            _raise_refusal(channel, exc)
        try:
            reply = channel.give(items)
        except (ProtocolError, OSError) as exc:
            raise HolderError(f"deposit failed: {exc}") from exc
    return DepositResult(list(reply.get("ids", [])), float(reply.get("ttl", 0.0)), spawned)


def claim(
    path: str,
    *,
    names: Iterable[str] | None = None,
    match: Iterable[Key] | None = None,
    ids: Iterable[int] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ClaimResult:
    """Take sockets out of the holder. With no selector at all, takes everything.

    A socket is taken if its name is in ``names``, its kernel identity key in
    ``match`` (``BindTarget.key`` / ``SocketIdentity.key``), or its id in
    ``ids``. The holder drops its copies only after our ``ok``.

    Raises:
        HolderError: no holder, or it refused.
    """
    header: dict[str, Any] = {"op": "claim"}
    if names is not None:
        header["names"] = sorted(set(names))
    if match is not None:
        header["match"] = [key_to_wire(k) for k in match]
    if ids is not None:
        header["ids"] = sorted(set(ids))
    if names is None and match is None and ids is None:
        header["all"] = True
    with connect(path, timeout=timeout) as channel:
        try:
            channel.send(header)
        except OSError as exc:
            _raise_refusal(channel, exc)
        try:
            transfer = channel.take()
        except (ProtocolError, OSError) as exc:
            raise HolderError(f"claim failed: {exc}") from exc
    result = ClaimResult(missing=[str(m) for m in transfer.meta.get("missing", [])])
    for item in transfer.sockets:
        name = item.name
        result.sockets.append(HeldSocket.adopt(item.socket(), name))
    return result


def list_parked(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[ParkedInfo]:
    """What the holder keeps (metadata only: no fd leaves the holder).

    Raises:
        HolderError: no holder, or it refused.
    """
    with connect(path, timeout=timeout) as channel:
        reply = _call(channel, {"op": "list"})
    out = []
    try:
        for entry in reply.get("sockets", []):
            out.append(
                ParkedInfo(
                    id=int(entry["id"]),
                    name=str(entry["name"]),
                    identity=SocketIdentity.from_wire(entry["wire"]),
                    inode=int(entry["inode"]),
                    expires_in=float(entry["expires_in"]),
                    depositor_pid=int(entry["depositor"]["pid"]),
                    depositor_uid=int(entry["depositor"]["uid"]),
                    via=str(entry.get("via", "handoff")),
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise HolderError(f"holder sent a malformed list: {exc}") from exc
    return out


def release(
    path: str,
    *,
    names: Iterable[str] | None = None,
    ids: Iterable[int] | None = None,
    everything: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Close held sockets now; returns how many were closed.

    Raises:
        HolderError: no holder, it refused, or no selector was given.
    """
    header: dict[str, Any] = {"op": "release"}
    if names is not None:
        header["names"] = sorted(set(names))
    if ids is not None:
        header["ids"] = sorted(set(ids))
    if everything:
        header["all"] = True
    with connect(path, timeout=timeout) as channel:
        reply = _call(channel, header)
    return int(reply.get("released", 0))


def spawn_holder(
    path: str,
    *,
    args: Sequence[str] = (),
    log_path: str | None = None,
    timeout: float = SPAWN_TIMEOUT,
) -> int:
    """Start ``nodrop hold --path PATH --exit-when-empty`` detached, and wait
    until it listens (its ``READY=1`` on a private notify socket).

    Returns:
        The holder's pid.

    Raises:
        HolderError: it did not report ready in time, or reported a failure
            (another holder won the race: then connect to that one).
    """
    argv = [
        sys.executable,
        "-m",
        "nodrop",
        "hold",
        "--path",
        path,
        "--exit-when-empty",
        *args,
    ]
    with NotifyReceiver() as receiver:
        env = dict(os.environ, NOTIFY_SOCKET=receiver.path)
        log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        try:
            starter = subprocess.Popen(
                [sys.executable, "-c", _DETACH, *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log if log is not None else None,
                close_fds=True,
            )
            try:
                starter.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                starter.kill()
                starter.wait()
                raise HolderError("the holder's starter did not exit") from exc
        finally:
            if log is not None:
                log.close()
        return _wait_ready(receiver, path, time.monotonic() + timeout)


def _wait_ready(receiver: NotifyReceiver, path: str, deadline: float) -> int:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HolderError(f"the holder started for {path} did not report ready")
        if not select.select([receiver], [], [], left)[0]:
            continue
        try:
            note = receiver.receive()
        except ProtocolError:
            continue
        if note is None:
            continue
        note.close_fds()
        if note.uid != os.geteuid():
            continue
        if note.fields.get("READY") == "1":
            return note.pid
        if "ERRNO" in note.fields:
            code = int(note.fields["ERRNO"]) if note.fields["ERRNO"].isdigit() else 0
            why = note.fields.get("STATUS", os.strerror(code) if code else "failed")
            if code == errno.EADDRINUSE:
                return 0  # another holder won the race; it listens there
            raise HolderError(f"the holder for {path} failed to start: {why}")


def holder_alive(path: str) -> bool:
    """True if a holder accepts at ``path``."""
    with contextlib.suppress(HolderError):
        connect(path, timeout=2.0).close()
        return True
    return False


def claim_matching(
    path: str, targets: Sequence[BindTarget], *, timeout: float = DEFAULT_TIMEOUT
) -> list[HeldSocket]:
    """Claim the parked sockets whose kernel identity matches one of
    ``targets`` (port-0 targets match nothing here).

    Returns:
        The claimed sockets; none when no holder listens at ``path`` (nothing
        to claim is not an error).

    Raises:
        HolderError: a holder is there and refused: binding beside it would
            only fail less clearly.
    """
    keys = [t.key for t in targets if not t.wildcard_port]
    if not keys:
        return []
    try:
        return claim(path, match=keys, timeout=timeout).sockets
    except HolderError as exc:
        if isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError):
            return []
        raise


def claim_listeners(
    path: str | None,
    targets: Sequence[BindTarget],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[HeldSocket]:
    """The listeners for ``targets``: the parked ones whose kernel identity
    matches are claimed (:func:`claim_matching`), the rest are bound here
    (:func:`~nodrop.listeners.reconcile.acquire`). Parked sockets that match
    no target stay in the holder until their TTL ends.

    Args:
        path: the holder, or None (or nothing listening there) to bind all.
        targets: from :func:`nodrop.listeners.bind.resolve_all`.

    Returns:
        One socket per target, in the order of ``targets``, named after it.

    Raises:
        HolderError: the holder refused.
        BindError: a missing listener could not be bound (the claimed ones
            are closed; the holder's copies are gone, the kernel sockets
            with them unless someone else holds them).
    """
    claimed = claim_matching(path, targets, timeout=timeout) if path is not None else []
    return acquire(targets, claimed)


def unclaimed(targets: Sequence[BindTarget], claimed: Sequence[HeldSocket]) -> list[BindTarget]:
    """The targets that none of ``claimed`` matches and that a holder could have
    held (a port-0 target never comes from one): each will be bound afresh.

    A parked socket the successor does not get is a new kernel socket, not the
    one clients were queued on: its TTL ran out before the claim, the holder
    is gone, or it was never parked.
    """
    keys = {held.identity.key for held in claimed}
    return [t for t in targets if not t.wildcard_port and t.key not in keys]


def fresh_bind_note(target: BindTarget, path: str) -> str:
    """One line saying ``target`` is bound afresh because the holder at
    ``path`` did not hold it (for a log, or stderr)."""
    what = target.spec.text or format_spec(target.spec)
    return (
        f"bound {what} fresh: the holder at {path} did not hold it (its TTL ran out "
        "before this claim, the holder is gone, or it was never parked); a TTL longer "
        "than the time to claim keeps the same socket"
    )
