"""How a holder runs: its paths, limits and timeouts (pure data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nodrop.holder import ops

DEFAULT_PEER_TIMEOUT = 10.0
"""Seconds a peer may take between two messages of one request."""
DEFAULT_IDLE_TIMEOUT = 60.0
"""Seconds an idle connection is kept."""
DEFAULT_FIRST_MESSAGE_TIMEOUT = 5.0
"""Seconds a new connection has to send its first message."""
DEFAULT_MAX_PEERS = 64
"""Connections at once. Past it, the oldest that has not spoken yet is dropped
to make room (a flood of silent connections never locks out list/claim);
only when every connection has spoken is a new one told "holder busy"."""
EMPTY_GRACE = 10.0
"""With ``exit_when_empty``: how long a holder that never held anything waits."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class HolderConfig:
    """How a holder runs.

    Attributes:
        path: its handoff socket, absolute or ``@abstract``.
        mode: file mode of the socket (a filesystem path only).
        allowed_uids: uids besides our own that may connect.
        allow_abstract: accept an ``@name`` path (no file permissions).
        ttl_default: seconds a deposit without a ttl is held.
        ttl_max: the longest ttl granted.
        max_held: most sockets held at once.
        fdstore_path: also accept systemd ``FDSTORE=1`` datagrams here.
        exit_when_empty: stop once nothing is held (for on-demand holders).
        peer_timeout: seconds allowed between messages of one request.
        idle_timeout: seconds an idle connection that has spoken is kept.
        first_message_timeout: seconds a new connection has to send a message.
        max_peers: connections at once (see :data:`DEFAULT_MAX_PEERS`).
    """

    path: str
    mode: int = 0o600
    allowed_uids: frozenset[int] = frozenset()
    allow_abstract: bool = False
    ttl_default: float = ops.DEFAULT_TTL
    ttl_max: float = ops.DEFAULT_TTL_MAX
    max_held: int = ops.DEFAULT_MAX_HELD
    fdstore_path: str | None = None
    exit_when_empty: bool = False
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    first_message_timeout: float = DEFAULT_FIRST_MESSAGE_TIMEOUT
    max_peers: int = DEFAULT_MAX_PEERS
