"""The connection broker: moves idle connections from old workers to new ones.

A companion of the supervisor, on its event loop (see ``Broker`` in
:mod:`nodrop.supervisor.companion`). It listens on a ``SOCK_SEQPACKET``
socket in a private directory (0700, socket 0600) and speaks the handoff
protocol (:mod:`nodrop.fdwire`); every peer must be a worker of this
supervisor (``SO_PEERCRED``).

* A worker that wants connections *registers* (``{"op":"register","room":N}``)
  and keeps that channel open; the broker pushes batches down it.
* A draining worker *gives* batches of idle connections (``meta.states``:
  opaque per-connection states). The broker spreads each over the registered
  workers of the active generation (even shares, rotating start, capped by
  their room), waits for their ``ok`` and answers with a verdict: placed,
  closed, and the indices it returns untouched.

Nothing is lost silently: with no receiver or no room, or a receiver that
refuses, the connections are *returned* unread (another receiver, or the
giver, who closes them between requests); a receiver that dies or stalls
after they were sent may have read them, so the broker closes them
gracefully (:class:`~nodrop.connhandoff.loopio.Lingering`) and counts them.
Back-pressure: one batch in flight per receiver, at most
``MAX_CONCURRENT_BATCHES`` batches (of at most 253) held at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Coroutine
from typing import Any, Literal, Protocol

# Imported here, not in _on_accept: at the fd limit an import cannot open its file.
from nodrop.accept_backoff import loop_accepted, loop_pause, out_of_resources
from nodrop.connhandoff.loopio import Lingering, LoopIO
from nodrop.connhandoff.receivers import Receiver, Receivers
from nodrop.connhandoff.wire import (
    MAX_BATCH,
    Verdict,
    decode_states,
    encode_states,
    parse_room,
    split_evenly,
)
from nodrop.errors import NodropError, ProtocolError
from nodrop.fdwire import Assembly, Channel, ReceivedSocket, Transfer, listen
from nodrop.kernel.fdpass import MAX_FDS_PER_MESSAGE, check_peer
from nodrop.supervisor.model import Generation, Worker

DEFAULT_ACK_TIMEOUT = 10.0
"""How long a receiving worker may take to acknowledge a batch."""
DEFAULT_LINGER = 2.0
"""How long a gracefully closed connection waits for the client's FIN."""
MAX_CONCURRENT_BATCHES = 8
MAX_PEERS = 4096
ACCEPTS_PER_WAKEUP = 64

Outcome = Literal["placed", "refused", "lost"]


class BrokerHost(Protocol):
    """What the broker needs of the supervisor."""

    @property
    def active(self) -> Generation | None: ...

    def worker_of(self, pid: int) -> tuple[Worker, Generation] | None: ...

    def log(self, message: str) -> None: ...


class ConnectionBroker:
    """Implements the supervisor's ``Broker`` protocol; see the module docstring.

    Args:
        path: where to listen (in a directory only we can enter).
        ack_timeout: receivers that do not acknowledge a batch within this
            are treated as dead.
        linger: see :data:`DEFAULT_LINGER`.
        private_dir: a directory the broker owns and removes on close.
        requested: handoff was asked for (``--handoff``), not on by default:
            workers that do not register are then a warning (``stats()``).
    """

    def __init__(
        self,
        path: str,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        linger: float = DEFAULT_LINGER,
        private_dir: str | None = None,
        requested: bool = True,
    ) -> None:
        self.path = path
        self.requested = requested
        self.ack_timeout = ack_timeout
        self.linger = linger
        self._private_dir = private_dir
        self._host: BrokerHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: set[Channel] = set()
        self._receivers = Receivers()
        self._held: dict[int, Transfer] = {}
        self._io = LoopIO()
        self._lingering = Lingering(linger)
        self._batches = asyncio.Semaphore(MAX_CONCURRENT_BATCHES)
        self._closed = False
        self.counts: collections.Counter[str] = collections.Counter()
        self._adopt: dict[str, Any] | None = None

    @classmethod
    def in_private_dir(cls, base: str | None = None, **kwargs: Any) -> ConnectionBroker:
        """A broker whose socket lives in a fresh 0700 directory (removed on close)."""
        directory = tempfile.mkdtemp(prefix="nodrop-handoff-", dir=base)
        return cls(os.path.join(directory, "broker.sock"), private_dir=directory, **kwargs)

    # -- life cycle ------------------------------------------------------------
    async def start(self, supervisor: BrokerHost) -> None:
        self._host = supervisor
        self._loop = asyncio.get_running_loop()
        if self._adopt is not None:
            self._adopt_state(self._adopt)
            self._adopt = None
        else:
            self._listener = listen(self.path, mode=0o600, backlog=128)
        assert self._listener is not None
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._on_accept)

    # -- across `nodrop reexec` ------------------------------------------------
    def export_state(self) -> tuple[dict[str, Any], list[int]]:
        """The listening socket and every registered receiver's channel, to
        keep across exec. Only when nothing is in flight.

        Raises:
            ProtocolError: a handoff is in progress (try again in a moment).
        """
        busy = self._held or self._lingering or any(r.lock.locked() for r in self._receivers)
        givers = len(self._channels) - len(self._receivers)
        if busy or givers:
            raise ProtocolError("a connection handoff is in progress; try again in a moment")
        assert self._listener is not None
        receivers = [
            {"fd": r.channel.fileno(), "pid": r.pid, "room": r.room, "accepting": r.accepting}
            for r in self._receivers
            if r.alive
        ]
        state = {
            "path": self.path,
            "private_dir": self._private_dir,
            "listener": self._listener.fileno(),
            "receivers": receivers,
            "counts": dict(self.counts),
            "requested": self.requested,
        }
        return state, [self._listener.fileno(), *(r["fd"] for r in receivers)]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ConnectionBroker:
        """A broker that, once started, takes over :meth:`export_state`'s
        sockets and receivers (the workers notice nothing)."""
        self = cls(
            state["path"],
            private_dir=state["private_dir"],
            requested=bool(state.get("requested", True)),
        )
        self._adopt = state
        return self

    def _adopt_state(self, state: dict[str, Any]) -> None:
        assert self._host is not None
        self.counts.update(state["counts"])
        os.set_inheritable(state["listener"], False)
        self._listener = socket.socket(fileno=state["listener"])
        for item in state["receivers"]:
            os.set_inheritable(item["fd"], False)
            channel = Channel(socket.socket(fileno=item["fd"]), timeout=0.0)
            entry = self._host.worker_of(item["pid"])
            if entry is None:  # that worker is gone: drop its channel
                channel.close()
                continue
            worker, gen = entry
            self._channels.add(channel)
            receiver = Receiver(channel, worker.pid, gen.number, worker, item["room"])
            receiver.accepting = item["accepting"]
            self._spawn(self._serve_adopted(receiver))

    async def _serve_adopted(self, receiver: Receiver) -> None:
        try:
            await self._receive_from(receiver)
        except ProtocolError as exc:
            if "peer closed" not in str(exc):
                self._log(f"handoff peer dropped: {exc}")
        except (OSError, TimeoutError) as exc:
            self._log(f"handoff peer dropped: {exc!r}")
        finally:
            self._channels.discard(receiver.channel)
            receiver.channel.close()

    def close(self) -> None:
        """Close everything now: peers, batches held, lingering connections."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        self._io.close()
        if loop is not None and self._listener is not None:
            loop.remove_reader(self._listener.fileno())
        for task in list(self._tasks):
            task.cancel()
        for transfer in list(self._held.values()):
            transfer.close()
        self._held.clear()
        for channel in list(self._channels):
            channel.close()
        self._channels.clear()
        self._lingering.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def stats(self) -> dict[str, Any]:
        """Counters for ``nodrop status``: connections given, placed in the new
        generation, returned to the giver, closed by the broker, and now."""
        return {
            "path": self.path,
            "requested": self.requested,
            "receivers": self._receivers.alive(),
            # The supervisor's workers (not their children) with a live receiver.
            "registered_workers": sorted(
                {r.worker.pid for r in self._receivers if r.alive and r.accepting}
            ),
            "given": self.counts["given"],
            "placed": self.counts["placed"],
            "returned": self.counts["returned"],
            "closed": self.counts["closed"],
            "refused_batches": self.counts["refused_batches"],
            "receivers_lost": self.counts["receivers_lost"],
            "lingering": len(self._lingering),
        }

    # -- peers -----------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if out_of_resources(exc):
                    # Still queued, the listener still readable: pause the
                    # watch (accept_backoff), or the loop spins.
                    loop_pause(self._listener, self._on_accept, self._log, "accept").failed(exc)
                else:
                    self._log(f"accept failed: {exc}")
                return
            loop_accepted(self._listener)
            channel = Channel(conn, timeout=0.0)
            if len(self._channels) >= MAX_PEERS:
                channel.reply_error(f"too many peers (limit {MAX_PEERS})")
                channel.close()
                continue
            self._channels.add(channel)
            self._spawn(self._serve(channel))

    async def _serve(self, channel: Channel) -> None:
        assert self._host is not None
        try:
            # Read the first message before any refusal: closing a SEQPACKET
            # socket with unread data resets it, and the peer would never
            # read why it was refused.
            header, fds = await self._io.recv(channel, MAX_FDS_PER_MESSAGE, None)
            try:
                creds = check_peer(channel.sock)
                entry = self._host.worker_of(creds.pid)
                if entry is None:
                    raise ProtocolError(f"pid {creds.pid} is not a worker of this supervisor")
            except NodropError as exc:
                for fd in fds:
                    os.close(fd)
                channel.reply_error(str(exc))
                return
            worker, gen = entry
            if header["op"] == "register":
                for fd in fds:
                    os.close(fd)
                await self._serve_receiver(channel, worker, gen, parse_room(header))
            elif header["op"] == "fds":
                await self._serve_giver(channel, creds.pid, (header, fds))
            else:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError(f"unexpected op {header['op']!r}")
        except ProtocolError as exc:
            if "peer closed" not in str(exc):
                self._log(f"handoff peer dropped: {exc}")
                channel.reply_error(str(exc))
        except (OSError, TimeoutError) as exc:
            self._log(f"handoff peer dropped: {exc!r}")
        finally:
            self._channels.discard(channel)
            channel.close()

    async def _serve_receiver(
        self, channel: Channel, worker: Worker, gen: Generation, room: int
    ) -> None:
        receiver = Receiver(channel, worker.pid, gen.number, worker, room)
        await self._io.send(channel, {"op": "ok", "generation": gen.number})
        await self._receive_from(receiver)

    async def _receive_from(self, receiver: Receiver) -> None:
        """A registered receiver's replies and room updates, until it goes."""
        channel = receiver.channel
        self._receivers.append(receiver)
        try:
            while True:
                header, _ = await self._io.recv(channel, 0, None)
                if header["op"] in ("ok", "error"):
                    receiver.replies.put_nowait(header)
                elif header["op"] == "room":
                    receiver.room = parse_room(header)
                elif header["op"] == "unregister":
                    receiver.accepting = False
                    self._spawn(self._unregister(receiver))
                else:
                    raise ProtocolError(f"unexpected op {header['op']!r} from a receiver")
        finally:
            receiver.alive = False
            self._receivers.remove(receiver)
            receiver.replies.put_nowait(None)

    async def _unregister(self, receiver: Receiver) -> None:
        # After the batch in flight, if any: the worker reads until this reply.
        async with receiver.lock:
            if receiver.alive:
                with contextlib.suppress(OSError, TimeoutError):
                    await self._io.send(
                        receiver.channel,
                        {"op": "unregistered"},
                        (),
                        time.monotonic() + self.ack_timeout,
                    )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_giver(
        self, channel: Channel, pid: int, first: tuple[dict[str, Any], list[int]] | None
    ) -> None:
        while True:
            transfer = await self._recv_transfer(channel, first)
            first = None
            self._held[id(transfer)] = transfer
            try:
                async with self._batches:
                    verdict = await self._place(transfer, pid)
            finally:
                self._held.pop(id(transfer), None)
                transfer.close()  # what is left: placed, returned (the giver keeps its copy)
            await self._io.send(
                channel, verdict.to_header(), (), time.monotonic() + self.ack_timeout
            )

    async def _recv_transfer(
        self, channel: Channel, first: tuple[dict[str, Any], list[int]] | None
    ) -> Transfer:
        assembly = Assembly(MAX_BATCH)
        transfer = assembly.transfer
        try:
            deadline: float | None = None
            while not assembly.done:
                if first is not None:
                    (header, fds), first = first, None
                else:
                    header, fds = await self._io.recv(channel, MAX_FDS_PER_MESSAGE, deadline)
                assembly.add(header, fds)
                if deadline is None:
                    deadline = time.monotonic() + self.ack_timeout
            for item in transfer.sockets:
                if item.identity.type != socket.SOCK_STREAM or item.identity.listening:
                    raise ProtocolError("only connected stream sockets can be handed over")
            transfer.meta["_states"] = decode_states(transfer.meta, len(transfer.sockets))
        except OSError as exc:
            # Nothing was placed: the giver must hear so and keep its
            # connections (a bare close would make it count them unknown).
            transfer.close()
            raise ProtocolError(f"cannot receive the batch: {exc}") from exc
        except BaseException:
            transfer.close()
            raise
        return transfer

    # -- placement -------------------------------------------------------------
    async def _place(self, transfer: Transfer, giver: int) -> Verdict:
        items = transfer.sockets
        states: list[bytes] = transfer.meta["_states"]
        self.counts["given"] += len(items)
        pending = list(range(len(items)))
        placed = 0
        lost: list[int] = []
        while pending:
            candidates = self._receivers.candidates(
                self._host.active if self._host else None, giver
            )
            shares = split_evenly(len(pending), [r.room for r in candidates])
            jobs = []
            for receiver, share in zip(candidates, shares, strict=True):
                if share:
                    part, pending = pending[:share], pending[share:]
                    receiver.room -= share  # reserved until its reply says how much is left
                    jobs.append((part, self._forward(receiver, items, states, part)))
            if not jobs:
                break
            outcomes = await asyncio.gather(*(job for _, job in jobs))
            for (part, _), outcome in zip(jobs, outcomes, strict=True):
                if outcome == "placed":
                    placed += len(part)
                elif outcome == "refused":
                    pending.extend(part)
                else:
                    lost.extend(part)
        for index in lost:
            self._lingering.close_gracefully(items[index].socket())
        self.counts["placed"] += placed
        self.counts["closed"] += len(lost)
        self.counts["returned"] += len(pending)
        return Verdict(placed, len(lost), tuple(sorted(pending)))

    async def _forward(
        self,
        receiver: Receiver,
        items: list[ReceivedSocket],
        states: list[bytes],
        part: list[int],
    ) -> Outcome:
        async with receiver.lock:
            if not (receiver.alive and receiver.accepting):
                return "refused"  # never sent: still untouched
            deadline = time.monotonic() + self.ack_timeout
            header: dict[str, Any] = {
                "op": "fds",
                "total": len(part),
                "offset": 0,
                "fds": [[items[i].name, *items[i].identity.to_wire()] for i in part],
                "meta": encode_states([states[i] for i in part]),
            }
            try:
                await self._io.send(receiver.channel, header, [items[i].fd for i in part], deadline)
            except (OSError, TimeoutError, ProtocolError) as exc:
                # SOCK_SEQPACKET is all or nothing: a failed send delivered nothing.
                self._log(f"cannot hand connections to pid {receiver.pid}: {exc!r}")
                self._receivers.drop(receiver, self.counts)
                return "refused"
            try:
                reply = await asyncio.wait_for(
                    receiver.replies.get(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                reply = None
            if reply is not None and reply["op"] == "ok":
                try:
                    receiver.room = parse_room(reply)
                except ProtocolError:
                    receiver.room = 0
                return "placed"
            if reply is not None:  # error: it closed them unread
                self.counts["refused_batches"] += 1
                receiver.room = 0
                return "refused"
            self._log(
                f"worker pid {receiver.pid} died or stalled while receiving {len(part)} "
                "connection(s): closing them gracefully"
            )
            self._receivers.drop(receiver, self.counts)
            return "lost"

    def _log(self, message: str) -> None:
        if self._host is not None:
            self._host.log(f"handoff broker: {message}")
