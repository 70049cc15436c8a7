"""``nodrop run --metrics tcp://127.0.0.1:9100``: Prometheus scrapes the
supervisor itself.

A minimal HTTP/1.1 responder on the supervisor's event loop: ``GET
/metrics`` answers the text exposition of the current status
(:func:`~.metrics.render_prometheus`), anything else 404. One request per
connection, bounded reads, no keep-alive: a scrape every few seconds needs
no more. Bind it to loopback or a private address: it has no
authentication (the numbers are not secret, but neither are they public).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from nodrop.errors import ConfigError
from nodrop.listeners.spec import Transport, parse_spec
from nodrop.supervisor.metrics import render_prometheus

MAX_HEAD = 8192
READ_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bind_metrics(spec_text: str) -> socket.socket:
    """The listening socket for ``--metrics tcp://HOST:PORT`` (an IP literal).

    Raises:
        ConfigError: not a TCP spec, or the address cannot be bound.
    """
    spec = parse_spec(spec_text)
    if spec.transport is not Transport.TCP or spec.host is None or spec.port is None:
        raise ConfigError(f"--metrics {spec_text}: expected tcp://HOST:PORT")
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--metrics {spec_text}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--metrics {spec_text}: {exc.strerror or exc}") from exc
    return sock


def response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def answer(request_line: bytes, status: Callable[[], Any]) -> bytes:
    """The response to one request line (pure but for ``status()``)."""
    parts = request_line.split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        return response("405 Method Not Allowed", b"GET /metrics\n")
    if parts[1].split(b"?")[0] != b"/metrics":
        return response("404 Not Found", b"GET /metrics\n")
    body = render_prometheus(dict(status())).encode()
    full = response("200 OK", body, CONTENT_TYPE)
    return full[: len(full) - len(body)] if parts[0] == b"HEAD" else full


class MetricsServer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._status: Callable[[], Any] = dict

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self, status: Callable[[], Any]) -> None:
        self._status = status
        self._server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(answer(head.split(b"\r\n", 1)[0], self._status))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            self.sock.close()
