"""One attempt in each mode, on asyncio's low-level socket calls.

This is the only module of the load generator that touches the network.
Each attempt returns an :class:`~nodrop.load.outcome.Outcome`; errors are
classified, never raised (apart from cancellation). Sockets are
non-blocking, close-on-exec and closed on every path.
"""

from __future__ import annotations

import asyncio
import socket
import time

from nodrop.errors import ProtocolError
from nodrop.load.http import ResponseParser
from nodrop.load.outcome import Outcome, classify

#: Bytes asked of each recv().
RECV_SIZE = 65536
#: After a complete ``Connection: close`` response, how long to wait for the
#: server's FIN so that TIME_WAIT stays on the server side (seconds).
CLOSE_WAIT_FOR_FIN = 0.05


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """Resolve once, up front, to a numeric address (no DNS per attempt).

    Raises:
        OSError: the host does not resolve.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    return family, (str(addr[0]), int(addr[1]))


async def open_connection(family: socket.AddressFamily, addr: tuple[str, int]) -> socket.socket:
    """Connect a non-blocking TCP socket; the caller owns (closes) it.

    Raises:
        OSError: the connect failed (refused, reset...).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)  # close-on-exec by default
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def read_response(sock: socket.socket, parser: ResponseParser) -> None:
    """Feed the parser until its response is complete or the peer closes.

    Raises:
        OSError: a receive failed.
        ProtocolError: the response is malformed.
    """
    loop = asyncio.get_running_loop()
    while not parser.complete:
        data = await loop.sock_recv(sock, RECV_SIZE)
        if not data:
            parser.feed_eof()
            return
        parser.feed(data)


async def _wait_for_fin(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CLOSE_WAIT_FOR_FIN):
            while await loop.sock_recv(sock, RECV_SIZE):
                pass
    except (TimeoutError, OSError):
        pass  # the response is already complete; this is only TIME_WAIT hygiene


async def http_close_attempt(
    family: socket.AddressFamily, addr: tuple[str, int], request: bytes, timeout: float
) -> tuple[Outcome, float]:
    """A new connection, one request with ``Connection: close``, one response.

    Returns:
        The outcome and the monotonic time it was known (the end of the
        latency; waiting for the server's FIN afterwards is not counted).
    """
    parser = ResponseParser()
    sock: socket.socket | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                sock = await open_connection(family, addr)
                await asyncio.get_running_loop().sock_sendall(sock, request)
                await read_response(sock, parser)
        except ProtocolError:
            return Outcome.BAD_STATUS, time.monotonic()
        except OSError as exc:  # includes TimeoutError
            outcome = classify(error=exc, status=parser.status, complete=parser.complete)
            return outcome, time.monotonic()
        done = time.monotonic()
        if parser.complete and not parser.keep_alive:
            await _wait_for_fin(sock)
        return classify(status=parser.status, complete=parser.complete), done
    finally:
        if sock is not None:
            sock.close()


async def tcp_line_attempt(
    family: socket.AddressFamily, addr: tuple[str, int], line: bytes, timeout: float
) -> Outcome:
    """A new connection, send ``line`` (ending in a newline), read one line back."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            sock = await open_connection(family, addr)
            try:
                await loop.sock_sendall(sock, line)
                while b"\n" not in received:
                    data = await loop.sock_recv(sock, RECV_SIZE)
                    if not data:
                        return Outcome.EOF
                    received += data
            finally:
                sock.close()
    except OSError as exc:
        return classify(error=exc)
    return Outcome.OK


class KeptConnection:
    """One HTTP/1.1 connection reused across attempts, reopened after a loss.

    Attributes:
        lost: ``(monotonic time, cause)`` of each loss of an established
            connection; cause is the failing Outcome or ``None`` for a clean
            close by the server (FIN while idle, or ``Connection: close``).
    """

    def __init__(
        self,
        family: socket.AddressFamily,
        addr: tuple[str, int],
        request: bytes,
        timeout: float,
    ) -> None:
        self._family = family
        self._addr = addr
        self._request = request
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self.lost: list[tuple[float, Outcome | None]] = []

    def close(self) -> None:
        """Close the connection if open."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drop(self, cause: Outcome | None) -> None:
        if self._sock is not None:
            self.lost.append((time.monotonic(), cause))
            self.close()

    def _check_idle(self) -> None:
        """Drop the connection if the server closed or reset it while idle.

        A well-behaved client checks before reusing a kept connection, so a
        server closing idle connections during a graceful reload does not
        become a failed request; only the unavoidable race remains.
        """
        if self._sock is None:
            return
        try:
            peeked = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # idle and open: the normal case
        except OSError as exc:
            self._drop(classify(error=exc))
            return
        if not peeked:
            self._drop(None)
        # Unsolicited bytes on an idle connection: leave them, the parser will fail.

    async def attempt(self) -> Outcome:
        """One request/response on the kept connection (connecting if needed)."""
        self._check_idle()
        parser = ResponseParser()
        outcome: Outcome
        try:
            async with asyncio.timeout(self._timeout):
                if self._sock is None:
                    self._sock = await open_connection(self._family, self._addr)
                await asyncio.get_running_loop().sock_sendall(self._sock, self._request)
                await read_response(self._sock, parser)
        except ProtocolError:
            outcome = Outcome.BAD_STATUS
        except OSError as exc:
            outcome = classify(error=exc, status=parser.status, complete=parser.complete)
        else:
            outcome = classify(status=parser.status, complete=parser.complete)
        if not parser.complete:
            self._drop(outcome)
        elif not parser.keep_alive:
            self._drop(None)
        return outcome
