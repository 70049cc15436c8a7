"""The connection-handoff messages, limits and batching (pure: no syscalls).

Connections travel over the core handoff protocol (:mod:`nodrop.fdwire`):
a batch of connections is one ``fds`` transfer whose ``meta`` carries one
opaque application state per connection, base64 in a JSON list::

    {"states": ["", "c2Vzc2lvbj0x", ...]}

The rest of the exchange (``register``, ``room``, the broker's verdict) is
described in ``docs/keepalive.md``; this module only builds and checks the
JSON, so every rule is testable without a socket.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodrop.errors import ProtocolError
from nodrop.kernel.fdpass import MAX_FDS_PER_MESSAGE

ENV = "NODROP_HANDOFF"
"""Where a worker finds the supervisor's connection broker."""
CONN_NAME = "conn"
"""The socket name every handed-over connection carries in the manifest."""
MAX_STATE = 4096
"""Largest opaque state one connection may carry (bytes, before base64)."""
MAX_BATCH_META = 32 * 1024
"""Budget for the ``states`` of one batch (JSON bytes): with 253 manifest
entries it keeps a batch inside one 64 KiB handoff message."""
MAX_BATCH = MAX_FDS_PER_MESSAGE
"""Connections per batch: one SCM_RIGHTS message."""
MAX_ROOM = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """The broker's answer to one batch a draining worker gave.

    Attributes:
        placed: connections a worker of the new generation adopted.
        closed: connections the broker closed gracefully (the receiving
            worker died or stalled after they were sent to it).
        returned: indices (into the batch) of connections nobody took; they
            were never read by anyone else and are still the giver's.
    """

    placed: int
    closed: int
    returned: tuple[int, ...]

    def to_header(self) -> dict[str, Any]:
        return {
            "op": "ok",
            "count": self.placed + self.closed + len(self.returned),
            "placed": self.placed,
            "closed": self.closed,
            "returned": list(self.returned),
        }

    @classmethod
    def from_header(cls, header: dict[str, Any], batch: int) -> Verdict:
        """Check the broker's reply against the batch it answers.

        Raises:
            ProtocolError: counts that do not add up to the batch.
        """
        placed, closed, returned = (
            header.get("placed"),
            header.get("closed"),
            header.get("returned"),
        )
        if not (
            isinstance(placed, int)
            and isinstance(closed, int)
            and _count(placed)
            and _count(closed)
            and isinstance(returned, list)
        ):
            raise ProtocolError("verdict needs placed, closed and returned")
        if not all(_count(i) and i < batch for i in returned) or len(set(returned)) != len(
            returned
        ):
            raise ProtocolError("verdict returns indices outside the batch")
        if placed + closed + len(returned) != batch:
            raise ProtocolError(
                f"verdict covers {placed + closed + len(returned)} of {batch} connections"
            )
        return cls(placed, closed, tuple(returned))


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def encode_state(state: bytes) -> str:
    if len(state) > MAX_STATE:
        raise ProtocolError(f"connection state of {len(state)} bytes exceeds {MAX_STATE}")
    return base64.b64encode(state).decode("ascii")


def encode_states(states: Sequence[bytes]) -> dict[str, Any]:
    """The ``meta`` of a batch (raises ProtocolError for an oversized state)."""
    return {"states": [encode_state(s) for s in states]}


def decode_states(meta: dict[str, Any], count: int) -> list[bytes]:
    """The states of a received batch of ``count`` connections.

    A batch without ``states`` carries none (every state is ``b""``).

    Raises:
        ProtocolError: not a list of ``count`` base64 strings within MAX_STATE.
    """
    raw = meta.get("states")
    if raw is None:
        return [b""] * count
    if not isinstance(raw, list) or len(raw) != count:
        raise ProtocolError(f"states must be a list of {count} strings")
    out = []
    for item in raw:
        if not isinstance(item, str) or len(item) > (MAX_STATE + 2) // 3 * 4:
            raise ProtocolError("connection state is not a string or is too long")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError("connection state is not base64") from exc
    return out


def plan_batches(
    state_sizes: Sequence[int], *, max_batch: int = MAX_BATCH, max_meta: int = MAX_BATCH_META
) -> list[tuple[int, int]]:
    """Split connections into batches ``[start, end)`` that each fit one message.

    Args:
        state_sizes: the raw size of each connection's state.
        max_batch: most connections per batch.
        max_meta: most JSON bytes of states per batch.

    Raises:
        ProtocolError: a single state larger than MAX_STATE.
    """
    batches: list[tuple[int, int]] = []
    start = 0
    used = 0
    for i, size in enumerate(state_sizes):
        if size > MAX_STATE:
            raise ProtocolError(f"connection state of {size} bytes exceeds {MAX_STATE}")
        cost = (size + 2) // 3 * 4 + 3  # base64, two quotes and a comma
        if i > start and (i - start >= max_batch or used + cost > max_meta):
            batches.append((start, i))
            start, used = i, 0
        used += cost
    if start < len(state_sizes):
        batches.append((start, len(state_sizes)))
    return batches


def register_header(room: int) -> dict[str, Any]:
    return {"op": "register", "room": room}


def parse_room(header: dict[str, Any]) -> int:
    """The ``room`` a receiving worker announces (register, or an ``ok`` reply).

    Raises:
        ProtocolError: missing, not an int, or out of range.
    """
    room = header.get("room")
    if type(room) is not int or not 0 <= room <= MAX_ROOM:
        raise ProtocolError(f"room must be an integer between 0 and {MAX_ROOM}")
    return room


def split_evenly(pending: int, rooms: Sequence[int]) -> list[int]:
    """How many of ``pending`` connections each receiver gets (pure).

    Even shares, capped by each receiver's room; what does not fit stays
    unassigned (the sum may be less than ``pending``).
    """
    shares = [0] * len(rooms)
    left = pending
    while left > 0:
        open_ = [i for i, room in enumerate(rooms) if room > shares[i]]
        if not open_:
            break
        each = max(1, left // len(open_))
        for i in open_:
            take = min(each, rooms[i] - shares[i], left)
            shares[i] += take
            left -= take
            if left == 0:
                break
    return shares
