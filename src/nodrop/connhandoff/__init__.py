"""Connection handoff: hand idle keep-alive and long-lived connections from
the old generation to the new one, so a reload closes none of them.

Workers find the supervisor's broker at ``$NODROP_HANDOFF``. See
``docs/keepalive.md`` for the design and the wire messages.

* asyncio servers: :class:`AsyncHandoff`, :func:`read_or_detach`,
  :func:`detach`;
* threaded servers: :class:`Receiver`, :class:`Giver`.
"""

from nodrop.connhandoff.aio import AsyncHandoff, Detached, buffered, detach, read_or_detach
from nodrop.connhandoff.client import (
    DEFAULT_ROOM,
    Adopted,
    Giver,
    GiveResult,
    Receiver,
    broker_path,
)
from nodrop.connhandoff.wire import ENV, MAX_STATE, Verdict

__all__ = [
    "DEFAULT_ROOM",
    "ENV",
    "MAX_STATE",
    "Adopted",
    "AsyncHandoff",
    "Detached",
    "GiveResult",
    "Giver",
    "Receiver",
    "Verdict",
    "broker_path",
    "buffered",
    "detach",
    "read_or_detach",
]
