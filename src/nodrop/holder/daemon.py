"""The holder: a single-threaded daemon that keeps deposited sockets open.

Jason Baron's "delayed close" for a Unix socket, in user space: a server
parks its listening sockets here with a time-to-live and exits; its
successor claims them; if none comes in time they are closed. While a
socket is held, the kernel keeps queueing connections on it, so none is
refused in the gap.

One ``selectors`` loop serves every peer; each connection is a small state
machine fed one non-blocking message at a time, so a peer that stalls,
lies or dies mid-transfer costs only itself: it gets an ``error`` (when it
can still hear one), its half-received fds are closed, and no socket the
holder already held is touched. A claimed socket leaves the holder only
when the claimant's ``ok`` arrives; any other ending puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from nodrop.accept_backoff import SelectorAcceptPause, out_of_resources
from nodrop.errors import HolderError, NodropError, PeerDeniedError, ProtocolError
from nodrop.fdwire import (
    MAX_MESSAGE,
    Assembly,
    Transfer,
    decode,
    encode,
    fds_messages,
    listen,
    refuse,
)
from nodrop.holder import ops
from nodrop.holder.config import EMPTY_GRACE, HolderConfig, Log
from nodrop.holder.fdstore import receive_datagrams
from nodrop.holder.peer import Peer, PeerState
from nodrop.holder.store import ParkedStore, summary
from nodrop.kernel.fdpass import (
    MAX_FDS_PER_MESSAGE,
    check_peer,
    recv_with_fds,
    send_with_fds,
)
from nodrop.lograte import WindowedLog
from nodrop.systemd.receiver import NotifyReceiver


def _stderr_log(line: str) -> None:
    os.write(2, (line + "\n").encode(errors="replace"))


class Holder:
    """The daemon. ``open()``, then ``serve()`` until ``stop()`` or empty.

    Args:
        config: see :class:`HolderConfig`.
        log: where to write one line per event (deposit, claim, expiry...).
        clock: monotonic seconds (a seam for tests).
    """

    def __init__(
        self,
        config: HolderConfig,
        *,
        log: Log = _stderr_log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.store = ParkedStore()
        self.peers: dict[int, Peer] = {}
        self._listener: socket.socket | None = None
        self._fdstore: NotifyReceiver | None = None
        self._selector = selectors.DefaultSelector()
        self._fdstore_garbage = WindowedLog(log, "bad fdstore datagrams")
        self.accept_pause = SelectorAcceptPause(
            self._selector, log, "nodrop hold: accept", "listener"
        )
        self._stopping = False
        self._started = clock()
        # stop() may run in a signal handler: a byte on this pipe wakes the
        # select(), which PEP 475 would otherwise resume with its old timeout.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- setup ------------------------------------------------------------
    def open(self) -> None:
        """Create the sockets.

        Raises:
            HolderError: bad path, or a holder already listens there.
        """
        cfg = self.config
        try:
            ops.check_holder_path(cfg.path, allow_abstract=cfg.allow_abstract)
            if cfg.fdstore_path is not None:
                ops.check_holder_path(cfg.fdstore_path, allow_abstract=cfg.allow_abstract)
        except ProtocolError as exc:
            raise HolderError(str(exc)) from exc
        if not cfg.path.startswith("@"):
            self._private_dir(os.path.dirname(cfg.path))
            if _in_use(cfg.path):
                raise HolderError(f"a holder already listens at {cfg.path}")
        try:
            self._listener = listen(cfg.path, mode=cfg.mode, backlog=128)
            self._listener.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
            if cfg.fdstore_path is not None:
                if not cfg.fdstore_path.startswith("@"):
                    self._private_dir(os.path.dirname(cfg.fdstore_path))
                old = os.umask(0o177)
                try:
                    self._fdstore = NotifyReceiver(cfg.fdstore_path)
                finally:
                    os.umask(old)
                if not cfg.fdstore_path.startswith("@"):
                    os.chmod(cfg.fdstore_path, cfg.mode)
                self._selector.register(self._fdstore, selectors.EVENT_READ, "fdstore")
        except OSError as exc:
            self.close()
            raise HolderError(f"cannot listen at {cfg.path}: {exc.strerror or exc}") from exc
        self.log(f"nodrop hold: listening at {cfg.path} (pid {os.getpid()})")

    def _private_dir(self, directory: str) -> None:
        """Create a missing parent directory owner-only (0700)."""
        if os.path.isdir(directory):
            return
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
        except OSError as exc:
            raise HolderError(f"cannot create {directory}: {exc.strerror}") from exc

    # -- main loop ----------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`serve` to return (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve(self, *, until: float | None = None) -> None:
        """Serve until :meth:`stop`, until the monotonic time ``until``, or, with
        ``exit_when_empty``, until nothing is held."""
        while not self._stopping:
            now = self.clock()
            if until is not None and now >= until:
                return
            if self._should_exit_empty(now):
                self.log("nodrop hold: nothing held; exiting")
                return
            self.step(self._next_timeout(now, until))

    def step(self, timeout: float) -> None:
        """One turn of the loop: wait up to ``timeout`` s, handle events, expire."""
        try:
            events = self._selector.select(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            events = []
        for key, mask in events:
            if key.data == "listener":
                self._accept()
            elif key.data == "fdstore" and self._fdstore is not None:
                args = (self.store, self.config, self.clock, self.log, self._fdstore_garbage)
                receive_datagrams(self._fdstore, *args)
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            else:
                peer = self.peers.get(key.fd)
                if peer is None:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(peer)
                if mask & selectors.EVENT_READ and key.fd in self.peers:
                    self._peer_readable(peer)
        now = self.clock()
        self._expire(now)
        self.accept_pause.resume(now)

    def _should_exit_empty(self, now: float) -> bool:
        if not self.config.exit_when_empty or self.store or self.peers:
            return False
        return self.store.ever_held or now - self._started >= EMPTY_GRACE

    def _next_timeout(self, now: float, until: float | None) -> float:
        times = [now + 60.0]
        times.extend(self.store.expiries())
        times.extend(p.deadline for p in self.peers.values())
        if until is not None:
            times.append(until)
        if self.accept_pause.resume_at is not None:
            times.append(self.accept_pause.resume_at)
        if self.config.exit_when_empty and not self.store.ever_held:
            times.append(self._started + EMPTY_GRACE)
        return max(0.0, min(times) - now)

    # -- peers --------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(16):  # bounded: other events get their turn
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if out_of_resources(exc):
                    # The connection stays queued and the listener readable:
                    # stop watching it for a while, or the loop spins.
                    self.accept_pause.failed(self._listener, exc, self.clock())
                else:  # ECONNABORTED and friends: that client gave up
                    self.log(f"nodrop hold: accept failed: {exc.strerror or exc}")
                return
            self.accept_pause.accepted(self.clock())
            conn.setblocking(False)
            try:
                creds = check_peer(conn, self.config.allowed_uids)
            except PeerDeniedError as exc:
                self.log(f"nodrop hold: denied: {exc}")
                refuse(conn, str(exc))
                continue
            if len(self.peers) >= self.config.max_peers and not self._evict_silent():
                refuse(conn, "holder busy: too many connections")
                continue
            peer = Peer(conn, creds, self.clock() + self.config.first_message_timeout)
            self.peers[conn.fileno()] = peer
            self._selector.register(conn, selectors.EVENT_READ, "peer")

    def _evict_silent(self) -> bool:
        """Drop the oldest connection that has not sent a message yet (dicts keep
        insertion order: the first found is the oldest). False if none."""
        for peer in self.peers.values():
            if not peer.spoke and peer.state is PeerState.IDLE:
                self._drop(peer)  # quietly: a flood must not flood the log too
                return True
        return False

    def _drop(self, peer: Peer, reason: str | None = None) -> None:
        """Forget a peer: its half-received fds are closed, its pending claim
        goes back to the held set, and it is told ``reason`` if it still listens."""
        peer.drop_incoming()
        self.store.put_back(peer.claimed)
        if peer.claimed:
            self.log(
                f"nodrop hold: claim by pid {peer.creds.pid} not acknowledged; "
                f"keeping {len(peer.claimed)} socket(s)"
            )
        peer.claimed = []
        for _, fds in peer.outbox:
            del fds  # the outbox holds the held sockets' own fds: never close them
        peer.outbox.clear()
        fd = peer.sock.fileno()
        self.peers.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        if reason is not None:
            self.log(f"nodrop hold: pid {peer.creds.pid}: {reason}")
            refuse(peer.sock, reason)
        else:
            peer.sock.close()

    def _peer_readable(self, peer: Peer) -> None:
        for _ in range(MAX_FDS_PER_MESSAGE + 2):  # bounded per turn
            if peer.sock.fileno() not in self.peers:
                return
            try:
                msg = recv_with_fds(peer.sock, MAX_MESSAGE + 1, MAX_FDS_PER_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except ProtocolError as exc:  # TruncatedError: its fds are closed already
                self._drop(peer, str(exc))
                return
            except OSError as exc:
                self._drop(peer, None if exc.errno == errno.ECONNRESET else str(exc))
                return
            if not msg.data and not msg.fds:
                if peer.state is not PeerState.IDLE:
                    self.log(f"nodrop hold: pid {peer.creds.pid} left mid-{peer.state.value}")
                self._drop(peer)
                return
            try:
                self._handle(peer, msg.data, msg.fds)
            except (NodropError, OSError) as exc:
                self._drop(peer, str(exc))
                return

    def _handle(self, peer: Peer, data: bytes, fds: list[int]) -> None:
        """One message from a peer. Raises to drop the peer (fds handled here)."""
        peer.spoke = True
        peer.deadline = self.clock() + self.config.peer_timeout
        if peer.state is PeerState.RECEIVING:
            self._deposit_chunk(peer, data, fds)
            return
        if fds:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("unexpected fds with this message")
        header = decode(data)
        if peer.state is PeerState.SENDING:
            if header["op"] == "ok" and not peer.outbox:
                self._claim_done(peer)
                return
            why = header.get("message", header["op"]) if header["op"] == "error" else "no ok"
            raise ProtocolError(f"claim not acknowledged ({str(why)[:200]})")
        request = ops.parse_request(header, ttl_max=self.config.ttl_max)
        if isinstance(request, ops.Deposit):
            peer.state = PeerState.RECEIVING
            peer.ttl = request.ttl if request.ttl is not None else self.config.ttl_default
        elif isinstance(request, ops.Claim):
            self._claim(peer, request.selector)
        elif isinstance(request, ops.ListParked):
            self._reply(peer, self.store.list_reply(self.clock()))
        else:
            self._reply(peer, {"op": "ok", "released": self._release(request.selector, peer)})
        if peer.state is PeerState.IDLE:
            peer.deadline = self.clock() + self.config.idle_timeout

    def _reply(self, peer: Peer, header: dict[str, Any], fds: list[int] | None = None) -> None:
        peer.outbox.append((encode(header), fds or []))
        self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        while peer.outbox:
            data, fds = peer.outbox[0]
            try:
                send_with_fds(peer.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                self._selector.modify(
                    peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "peer"
                )
                return
            except OSError as exc:
                self._drop(peer, None if exc.errno in (errno.EPIPE, errno.ECONNRESET) else str(exc))
                return
            peer.outbox.popleft()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(peer.sock, selectors.EVENT_READ, "peer")

    # -- deposit -------------------------------------------------------------
    def _deposit_chunk(self, peer: Peer, data: bytes, fds: list[int]) -> None:
        if peer.incoming is None:
            room = self.config.max_held - len(self.store) - self._pending()
            peer.incoming = Assembly(max_total=max(0, room))
        assembly = peer.incoming
        try:
            header = decode(data)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            peer.drop_incoming()
            raise
        try:
            before = len(assembly.transfer.sockets)
            assembly.add(header, fds)  # closes the chunk's fds if it refuses them
            ops.check_names(item.name for item in assembly.transfer.sockets[before:])
        except ProtocolError:
            peer.drop_incoming()
            raise
        if not assembly.done:
            return
        ids = self._commit_deposit(peer, assembly.transfer)
        peer.state = PeerState.IDLE
        self._reply(peer, {"op": "ok", "count": len(ids), "ids": ids, "ttl": peer.ttl})

    def _pending(self) -> int:
        return sum(p.pending() for p in self.peers.values())

    def _commit_deposit(self, peer: Peer, transfer: Transfer) -> list[int]:
        """Adopt the transfer's fds. What the kernel says an fd is wins over the
        manifest; an fd that is not a socket fails the whole deposit."""
        adopted: list[tuple[socket.socket, str]] = []
        try:
            for item in transfer.sockets:
                adopted.append((item.socket(), item.name))
        except OSError as exc:
            for sock, _ in adopted:
                sock.close()
            peer.drop_incoming()
            raise ProtocolError(f"a deposited fd is not a socket: {exc.strerror}") from exc
        peer.incoming = None
        expires = self.clock() + peer.ttl
        ids = [self.store.add(sock, name, expires, peer.creds, "handoff") for sock, name in adopted]
        self.log(
            f"nodrop hold: pid {peer.creds.pid} deposited {len(ids)} socket(s) "
            f"for {peer.ttl:g}s: {summary(self.store.items[i] for i in ids if i in self.store.items)}"
        )
        return ids

    # -- claim / list / release ---------------------------------------------
    def _claim(self, peer: Peer, selector: ops.Selector) -> None:
        chosen = self.store.take(self.store.select(selector))
        peer.claimed = chosen
        peer.state = PeerState.SENDING
        missing = sorted(selector.names - {h.name for h in chosen})[:64]
        meta = {"ids": [h.id for h in chosen][:1024], "missing": missing}
        peer.outbox.extend(fds_messages(chosen, meta))
        self._flush(peer)

    def _claim_done(self, peer: Peer) -> None:
        if peer.claimed:
            self.log(
                f"nodrop hold: pid {peer.creds.pid} claimed {len(peer.claimed)} socket(s): "
                f"{summary(peer.claimed)}"
            )
        for item in peer.claimed:
            item.sock.close()
        peer.claimed = []
        peer.state = PeerState.IDLE
        peer.deadline = self.clock() + self.config.idle_timeout

    def _release(self, selector: ops.Selector, peer: Peer) -> int:
        chosen = self.store.discard(self.store.select(selector))
        if chosen:
            self.log(
                f"nodrop hold: pid {peer.creds.pid} released {len(chosen)} socket(s): "
                f"{summary(chosen)}"
            )
        return len(chosen)

    # -- expiry ---------------------------------------------------------------
    def _expire(self, now: float) -> None:
        self._fdstore_garbage.tick(now)
        gone = self.store.discard(self.store.expired(now))
        if gone:
            self.log(f"nodrop hold: expired, closed {len(gone)} socket(s): {summary(gone)}")
        for peer in list(self.peers.values()):
            if peer.deadline <= now:
                if peer.state is PeerState.IDLE:
                    self._drop(peer)
                else:
                    self._drop(peer, f"timed out during {peer.state.value}")

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        """Close every peer, every held socket and the holder's own sockets."""
        for peer in list(self.peers.values()):
            self._drop(peer)
        if self.store:
            self.log(f"nodrop hold: stopping; closing {len(self.store)} parked socket(s)")
        self.store.close()
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            if not self.config.path.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(self.config.path)
            self._listener = None
        if self._fdstore is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._fdstore)
            self._fdstore.close()
            if self.config.fdstore_path and not self.config.fdstore_path.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(self.config.fdstore_path)
            self._fdstore = None
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_use(path: str) -> bool:
    """True if something accepts on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError as exc:
        return exc.errno not in (errno.ENOTSOCK, errno.EPROTOTYPE)
    finally:
        probe.close()
    return True
