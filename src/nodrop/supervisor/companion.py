"""The seam between the supervisor and its connection broker.

The supervisor runs the broker of keep-alive handoff on its own event loop
but does not import it: ``nodrop run`` builds a
:class:`nodrop.connhandoff.broker.ConnectionBroker` and hands it in, and
tests may hand in anything with this shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nodrop.connhandoff.broker import BrokerHost


class Broker(Protocol):
    """A companion service on the supervisor's loop (the connection broker of
    keep-alive handoff): workers find it at ``$NODROP_HANDOFF``."""

    path: str

    async def start(self, supervisor: BrokerHost) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def export_state(self) -> tuple[dict[str, Any], list[int]]:
        """For ``nodrop reexec``: the broker's state and the fds to keep."""
