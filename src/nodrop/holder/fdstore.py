"""systemd's fd store, spoken by the holder: ``FDSTORE=1`` with ``FDNAME=``
parks the datagram's sockets; ``FDSTOREREMOVE=1`` closes those of a name."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from nodrop.errors import NodropError, PeerDeniedError, ProtocolError
from nodrop.holder import ops
from nodrop.holder.config import HolderConfig, Log
from nodrop.holder.store import ParkedStore
from nodrop.kernel.fdpass import Credentials
from nodrop.lograte import WindowedLog
from nodrop.systemd.receiver import Notification, NotifyReceiver


def store_datagram(
    store: ParkedStore, config: HolderConfig, now: float, log: Log, note: Notification
) -> None:
    """Act on one fd-store datagram. Fds not parked stay in ``note.fds`` for
    the caller to close.

    Raises:
        PeerDeniedError: the sender's uid may not use the fd store.
        ProtocolError: malformed fields, or more sockets than ``max_held``.
    """
    pid, uid, fds = note.pid, note.uid, note.fds
    if uid != os.geteuid() and uid not in config.allowed_uids:
        raise PeerDeniedError(f"uid {uid} may not use the fd store")
    request = ops.parse_fdstore(note.fields, ttl_max=config.ttl_max)
    creds = Credentials(pid, uid, note.gid)
    if isinstance(request, ops.FdStoreRemove):
        gone = store.discard(store.named(request.name))
        log(f"nodrop hold: fdstore: pid {pid} removed {len(gone)} {request.name!r}")
        return
    if request is None:
        return
    if len(store) + len(fds) > config.max_held:
        raise ProtocolError(f"holding {len(store)}; would exceed {config.max_held}")
    ttl = request.ttl if request.ttl is not None else config.ttl_default
    ids = []
    while fds:
        fd = fds.pop(0)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            log(f"nodrop hold: fdstore: pid {pid} sent an fd that is not a socket")
            continue
        ids.append(store.add(sock, request.name, now + ttl, creds, "fdstore"))
    log(
        f"nodrop hold: fdstore: pid {pid} stored {len(ids)} socket(s) as {request.name!r} for {ttl:g}s"
    )


def receive_datagrams(
    receiver: NotifyReceiver,
    store: ParkedStore,
    config: HolderConfig,
    clock: Callable[[], float],
    log: Log,
    garbage: WindowedLog,
) -> None:
    """Act on the fd-store datagrams waiting on ``receiver`` (at most 64 a
    turn); malformed or refused ones are logged through ``garbage``, rate
    limited, and their fds closed."""
    for _ in range(64):  # bounded per turn
        try:
            note = receiver.receive()
        except ProtocolError as exc:
            garbage.report(f"nodrop hold: fdstore: {exc}", clock())
            continue
        except OSError as exc:
            log(f"nodrop hold: fdstore: {exc.strerror or exc}")
            return
        if note is None:
            return
        try:
            store_datagram(store, config, clock(), log, note)
        except NodropError as exc:
            garbage.report(f"nodrop hold: fdstore: pid {note.pid}: {exc}", clock())
        finally:
            note.close_fds()
