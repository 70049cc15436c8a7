"""Measurement only: granian 2.8.7 serving nodrop's inherited socket.

granian's command line binds its own sockets (``--host/--port`` or
``--uds``; no fd option). Its Rust ``SocketHolder(fd, uds, backlog)`` can
wrap an existing listening fd, but no public Python API takes one: this
script overrides the private ``_init_shared_socket`` of granian's
(experimental) embedded server to hand it ``LISTEN_FDS``'s socket, says
``READY=1`` after the ASGI lifespan start-up, and stops the server on
SIGTERM. It serves -- and shows why no granian cell can be zero-drop: at
shutdown granian's Rust server closes idle keep-alive connections at once,
which Python cannot prevent. Run it with ``stack_clients.py``::

    python tests/children/servers/stack_clients.py --reloads 5 --workers 1 -- \
        python tests/children/servers/granian_fd.py
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import stack_starlette
from granian._granian import SocketHolder
from granian.constants import Interfaces
from granian.server.embed import Server

import nodrop

BACKLOG = 1024


class FdServer(Server):
    """granian's embedded server on an fd it did not create (private API)."""

    def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fd = fd

    def _init_shared_socket(self) -> None:
        self._ssp = None
        self._shd = SocketHolder(self.fd, False, BACKLOG)
        self._sfd = self.fd


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":

        async def send_then_ready(message: Any) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                nodrop.ready(status="granian serving")

        await stack_starlette.app(scope, receive, send_then_ready)
        return
    await stack_starlette.app(scope, receive, send)


async def main() -> None:
    (listener,) = nodrop.listen_fds(unset_environment=True)
    server = FdServer(listener.socket.detach(), app, interface=Interfaces.ASGI, log_level="warning")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
    await server.serve()


if __name__ == "__main__":
    asyncio.run(main())
