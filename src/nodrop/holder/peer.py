"""One connection to the holder: a small state machine fed one message at a time."""

from __future__ import annotations

import enum
import socket
from collections import deque
from dataclasses import dataclass, field

from nodrop.fdwire import Assembly
from nodrop.holder.store import Parked
from nodrop.kernel.fdpass import Credentials


class PeerState(enum.Enum):
    IDLE = "idle"
    RECEIVING = "receiving"  # a deposit's transfer is arriving
    SENDING = "sending"  # a claim's transfer is going out, then we await ok


@dataclass(eq=False)
class Peer:
    sock: socket.socket
    creds: Credentials
    deadline: float
    state: PeerState = PeerState.IDLE
    ttl: float = 0.0
    incoming: Assembly | None = None
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)
    claimed: list[Parked] = field(default_factory=list)
    close_after_flush: bool = False
    spoke: bool = False
    """It has sent a message: until then it is the first to go when full."""

    def drop_incoming(self) -> None:
        if self.incoming is not None:
            self.incoming.transfer.close()
        self.incoming = None

    def pending(self) -> int:
        """Sockets this peer holds in flight: half-deposited or being claimed."""
        received = 0 if self.incoming is None else len(self.incoming.transfer.sockets)
        return received + len(self.claimed)
