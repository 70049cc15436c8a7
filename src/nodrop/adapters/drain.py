"""Drain an ``asyncio`` server: stop accepting, keep what was accepted.

The naive drain, ``server.close()`` from a SIGTERM handler, can reset
connections on Python 3.11. The event loop accepts in a reader callback and
sets each accepted connection up in a task that runs one loop iteration
later; ``Server.close()`` in between makes that task's ``Server._attach()``
fail, and the accepted socket is dropped with the client's request unread,
which the kernel answers with a reset. Under ``nodrop run`` the listening
socket lives on in the new generation, so the fix is only ordering:

1. stop watching the listening sockets (no new ``accept()``; connections
   still queued stay in the kernel's queue for the new generation);
2. let the loop run the set-up tasks already scheduled;
3. only then close the server, and wait for its connections to finish.

:func:`drain` does the three; :func:`stop_accepting` the first two, for
servers (aiohttp, uvicorn) that close themselves afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Iterable
from typing import Protocol

DEFAULT_DRAIN_TIMEOUT = 30.0
"""Seconds :func:`drain` waits for accepted connections to finish."""

DEFAULT_SETTLE = 0.1
"""Seconds a server that closes idle connections at shutdown (uvicorn,
hypercorn, aiohttp) should wait after :func:`stop_accepting`: a connection
accepted just before has this long for its request to arrive and be read,
so it is not mistaken for an idle keep-alive connection and closed unanswered."""

_POLL_INTERVAL = 0.01
_SETUP_ITERATIONS = 3
"""Loop iterations to let already-accepted connections finish setting up:
the set-up task's first step (transport), then ``connection_made``, then the
first ``data_received`` or the handler task's first step."""


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def _listening_fds(target: asyncio.AbstractServer | Iterable[HasFileno | int]) -> list[int]:
    # uvloop's Server is no asyncio.AbstractServer (and not iterable): any
    # object with ``sockets`` is taken for a server.
    if isinstance(target, asyncio.AbstractServer) or hasattr(target, "sockets"):
        sockets = getattr(target, "sockets", None) or ()
        return [sock.fileno() for sock in sockets]
    return [item if isinstance(item, int) else item.fileno() for item in target]


async def stop_accepting(
    target: asyncio.AbstractServer | Iterable[socket.socket | HasFileno | int],
    *,
    settle: float = 0.0,
) -> None:
    """Stop accepting on listening sockets without closing anything.

    Connections the loop has accepted finish setting up (their transports
    attach to their server); connections not yet accepted stay in the
    listening socket's kernel queue, where another process sharing the
    socket (the new generation) accepts them. Closing the server afterwards
    is the caller's (or the web server's own shutdown's) job.

    Args:
        target: a server from ``asyncio.start_server``/``loop.create_server``,
            or the listening sockets (or fds) a server was given with
            ``sock=`` -- for servers that do not expose theirs (aiohttp's
            ``SockSite``, hypercorn).
        settle: seconds to wait afterwards (see :data:`DEFAULT_SETTLE`).

    Works with the standard selector event loop, which watches each
    listening socket with a reader; on another loop (uvloop) it only waits.
    """
    loop = asyncio.get_running_loop()
    for fd in _listening_fds(target):
        loop.remove_reader(fd)
    for _ in range(_SETUP_ITERATIONS):
        await asyncio.sleep(0)
    if settle > 0:
        await asyncio.sleep(settle)


async def drain(server: asyncio.Server, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> bool:
    """Stop accepting, close ``server``, wait for its connections to end.

    Args:
        server: from ``asyncio.start_server`` or ``loop.create_server``.
        timeout: how long to wait for the accepted connections, in seconds.

    Returns:
        True if every connection ended within ``timeout``.
    """
    await stop_accepting(server)
    server.close()
    deadline = time.monotonic() + timeout
    if sys.version_info >= (3, 12):
        # From 3.12, wait_closed() waits for the server's connections.
        try:
            await asyncio.wait_for(server.wait_closed(), timeout)
        except TimeoutError:
            return False
        return True
    # On 3.11, wait_closed() returns at once once the server is closed; the
    # count of attached transports is the only record of what is in flight.
    while getattr(server, "_active_count", 0) > 0:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True
