"""What :mod:`nodrop.adapters.aiohttp` needs from aiohttp's internals: the
connection handoff.

aiohttp has no API to take an idle connection out of its server. Each
connection is a ``web_protocol.RequestHandler`` (an asyncio protocol made by
``runner.server``); :class:`Tracked` sits in front of it as the transport's
protocol, forwards every call, and keeps what is needed to hand the
connection over safely:

* which bytes the handler's parser holds that did not make a request yet
  (aiohttp's C parser keeps them out of reach, so :class:`Tracked` counts
  request heads and ``Content-Length`` bodies itself, and gives up on a
  connection -- it is then closed with ``Connection: close`` instead -- as
  soon as it cannot tell: pipelining, chunked request bodies, bare-LF heads);
* once draining, it pauses reading as soon as a request is complete, so the
  next request stays in the kernel and travels with the socket.

It reads these ``RequestHandler`` attributes (checked by
:func:`check_internals` and ``tests/test_adapter_aiohttp_internals.py``):
``transport``, ``_waiter`` (the future ``start()`` awaits between
requests), ``_messages``, ``_current_request``, ``_request_in_progress``,
``_request_count``, ``_upgraded``, ``_payload_parser``, ``_message_tail``,
``_close``, ``_force_close``. Tested with :data:`TESTED_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, cast

from aiohttp.web_protocol import RequestHandler

from nodrop.adapters.pinning import version_problems
from nodrop.connhandoff import MAX_STATE

TESTED_VERSIONS = {"aiohttp": "3.14.5"}
"""The versions this module was written against and tested with."""

HANDLER_ATTRIBUTES = (
    "_waiter",
    "_messages",
    "_current_request",
    "_request_in_progress",
    "_request_count",
    "_upgraded",
    "_payload_parser",
    "_message_tail",
    "_close",
    "_force_close",
)


def check_internals() -> list[str]:
    """What this module relies on that the installed aiohttp lacks (empty: all there)."""
    problems = version_problems(TESTED_VERSIONS)
    slots = set(getattr(RequestHandler, "__slots__", ()))
    for cls in RequestHandler.__mro__:
        slots |= set(getattr(cls, "__slots__", ()))
    problems += [
        f"RequestHandler has no {name}" for name in (*HANDLER_ATTRIBUTES, "transport")
        if name not in slots
    ]  # fmt: skip
    return problems


def _head_end(data: bytes | bytearray) -> int:
    """Index just past the request head's blank line, or -1 (CRLF heads only)."""
    index = data.find(b"\r\n\r\n")
    return -1 if index < 0 else index + 4


def _body_length(head: bytes | bytearray) -> int | None:
    """The request's ``Content-Length`` (0 when none), or None when the body's
    length cannot be told from the head (``Transfer-Encoding``, bad values)."""
    length = 0
    for line in bytes(head).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
            if length < 0:
                return None
    return length


class Tracked(asyncio.Protocol):
    """A ``RequestHandler`` as the transport sees it, with the byte accounting
    that tells whether its connection can be handed over.

    Args:
        handler: the real protocol (``runner.server()``).
        prefix: bytes an old generation had read from this connection; fed
            to the handler right after ``connection_made``.
        registry: the set this object lives in while connected.
    """

    def __init__(
        self, handler: RequestHandler, prefix: bytes, registry: set[Tracked], owner: Any
    ) -> None:
        self.handler = handler
        self.prefix = prefix
        self.registry = registry
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.unparsed = bytearray()  # bytes of a request head still incomplete
        self.body_remaining = 0  # Content-Length bytes still to come
        self.unknown = False  # the parser's state can no longer be told
        self.paused = False

    # -- asyncio.Protocol, forwarded -------------------------------------------

    @property
    def upgraded(self) -> bool:
        """The connection was upgraded (a WebSocket): no longer HTTP."""
        return bool(self.handler._upgraded)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.registry.add(self)
        self.handler.connection_made(transport)
        if self.prefix:
            self.data_received(self.prefix)
            self.prefix = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def eof_received(self) -> bool | None:
        self.handler.eof_received()
        return None  # as RequestHandler: the transport closes itself

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        before = handler._request_count
        handler.data_received(data)
        produced = handler._request_count - before
        if self.unknown:
            return
        if self.body_remaining:
            if produced or len(data) > self.body_remaining:
                self.unknown = True  # a next request behind the body: pipelined
                return
            self.body_remaining -= len(data)
        elif produced == 0:
            self.unparsed += data
            if len(self.unparsed) > MAX_STATE:
                self.unknown = True
            return
        elif produced == 1:
            self._one_request(self.unparsed + data)
            self.unparsed.clear()
        else:
            self.unknown = True
            return
        if self.body_remaining == 0 and self.owner.draining_to_give:
            self.pause()  # the next request waits in the kernel, to travel with the socket

    def _one_request(self, data: bytes | bytearray) -> None:
        end = _head_end(data)
        length = _body_length(data[:end]) if end > 0 else None
        if length is None or len(data) - end > length:
            self.unknown = True
            return
        self.body_remaining = length - (len(data) - end)

    # -- the handoff -----------------------------------------------------------

    def pause(self) -> None:
        if self.transport is not None and not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        if self.transport is not None and self.paused and not self.transport.is_closing():
            self.transport.resume_reading()
        self.paused = False

    def idle(self) -> bool:
        """Between requests: waiting for the next one, nothing queued or to write."""
        handler, transport = self.handler, self.transport
        waiter = handler._waiter
        return (
            transport is not None
            and not transport.is_closing()
            and waiter is not None
            and not waiter.done()
            and not handler._messages
            and handler._current_request is None
            and not handler._request_in_progress
            and not handler._upgraded
            and handler._payload_parser is None
            and not handler._message_tail
            and not handler._close
            and not handler._force_close
            and not transport.get_write_buffer_size()
        )

    def handoff_prefix(self) -> bytes | None:
        """What to send along if the connection can be handed over now, else None."""
        if self.unknown or self.body_remaining or not self.idle():
            return None
        assert self.transport is not None
        if self.transport.get_extra_info("ssl_object") is not None:
            return None
        return bytes(self.unparsed)

    def detach(self) -> socket.socket:
        """The socket, out of aiohttp: a duplicate fd; the transport is aborted
        (its fd closed, no shutdown), and the handler ends as if the peer left."""
        assert self.transport is not None
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))  # os.dup: close-on-exec
        sock.setblocking(False)
        self.transport.abort()
        return sock
