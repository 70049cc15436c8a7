"""The broker's registered receivers, and which of them may take a batch."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

from nodrop.fdwire import Channel
from nodrop.supervisor.model import Generation, GenState, Worker, WorkerState


@dataclass(eq=False)
class Receiver:
    """A worker registered to receive connections, and its channel."""

    channel: Channel
    pid: int
    generation: int
    worker: Worker
    room: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    replies: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    alive: bool = True
    accepting: bool = True
    dropped: bool = False


class Receivers(list[Receiver]):
    """Registered receivers, in registration order."""

    _rotate = 0

    def alive(self) -> int:
        return sum(1 for r in self if r.alive)

    def candidates(self, active: Generation | None, giver: int) -> list[Receiver]:
        """Who may take connections from ``giver`` now: ready workers of the
        active generation with room, not the giver itself; the starting point
        rotates so batches spread over them."""
        if active is None or active.state is not GenState.ACTIVE:
            return []
        out = [
            r
            for r in self
            if r.alive
            and r.accepting
            and r.room > 0
            and r.pid != giver
            and r.generation == active.number
            and r.worker.state is WorkerState.READY
        ]
        if out:
            self._rotate = (self._rotate + 1) % len(out)
            out = out[self._rotate :] + out[: self._rotate]
        return out

    def drop(self, receiver: Receiver, counts: collections.Counter[str]) -> None:
        """``receiver`` is dead to us (counted once); its reader wakes up."""
        receiver.alive = False
        if not receiver.dropped:
            receiver.dropped = True
            counts["receivers_lost"] += 1
            with contextlib.suppress(OSError):
                receiver.channel.sock.shutdown(socket.SHUT_RDWR)
