"""The control socket: ``nodrop reload``, ``status``, ``stop``, ``reexec``.

A ``SOCK_STREAM`` Unix socket, mode 0600, in a 0700 directory; every peer's
uid is checked with ``SO_PEERCRED``. One JSON object per line each way:

    → {"cmd": "reload", "wait": "ready"}      ("ready" or "drained")
    ← {"ok": true, "generation": 4, "message": "...", "duration": 0.41, ...}

A reload answers when its outcome is known (new generation ready, or rolled
back); with ``"wait": "drained"`` only once the old generation has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, cast

from nodrop.errors import ControlError, PeerDeniedError, UntrustedError
from nodrop.kernel.fdpass import check_peer, peer_credentials
from nodrop.supervisor.api import ControlRequest, Reply
from nodrop.supervisor.controldir import (
    check_private_dir,
    default_dir,
    ensure_private_dir,
    is_default,
)

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0
"""Seconds a client has, once connected, to send its one-line request."""
MAX_READING = 32
"""Connections still sending their request; past it the oldest is dropped, so a
flood of silent or half-written requests never locks a real client out."""
CONNECT_WAIT = 30.0
"""Seconds a client without a timeout waits for room in a full listen backlog."""
MAX_CONNECTIONS = 256
"""Connections at once (requests waiting on a reload included); past it a new
one is told "busy" and closed."""
AF_UNIX_PATH_MAX = 107
"""Bytes in a Unix socket path (``sun_path`` holds 108 with the trailing NUL)."""
COMMANDS = ("reload", "status", "stop", "reexec")

Handler = Callable[[ControlRequest], Awaitable[Reply]]


def default_control_path(name: str = "nodrop") -> str:
    """Where the control socket lives unless ``--control`` says otherwise.

    ``$NODROP_CONTROL`` if set; else ``NAME.sock`` in the control directory
    (:func:`nodrop.supervisor.controldir.default_dir`:
    ``$XDG_RUNTIME_DIR/nodrop``, ``/run/nodrop`` for root, else
    ``/tmp/nodrop-UID``, checked before use).
    """
    explicit = os.environ.get("NODROP_CONTROL")
    if explicit:
        return explicit
    return os.path.join(default_dir(), f"{name}.sock")


def check_path_length(path: str) -> None:
    """Refuse a socket path the kernel cannot bind or connect to (pure).

    Raises:
        ControlError: naming the path, its length and the limit.
    """
    size = len(os.fsencode(path))
    if size > AF_UNIX_PATH_MAX:
        raise ControlError(
            f"control socket path {path} is {size} bytes; a Unix socket path is at most "
            f"{AF_UNIX_PATH_MAX} bytes: give a shorter --control (or $XDG_RUNTIME_DIR)"
        )


def parse_request(line: bytes) -> ControlRequest:
    """Decode one request (pure). Raises ControlError."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError("request is not JSON") from exc
    if not isinstance(request, dict) or request.get("cmd") not in COMMANDS:
        raise ControlError(f"unknown command; expected one of {', '.join(COMMANDS)}")
    if request.get("wait", "ready") not in ("ready", "drained"):
        raise ControlError("wait must be 'ready' or 'drained'")
    return cast(ControlRequest, request)


def prepare_control_dir(path: str) -> None:
    """Check ``path`` and make its directory, before anything else starts.

    In the default control directory, that directory must be ours
    (:func:`~nodrop.supervisor.controldir.ensure_private_dir`).

    Raises:
        UntrustedError: the default control directory is not ours.
        ControlError: the path is too long, or its directory cannot be made
            (one line naming it).
    """
    check_path_length(path)
    directory = os.path.dirname(path) or "."
    try:
        if is_default(path):
            ensure_private_dir(directory)
        else:
            os.makedirs(directory, mode=0o700, exist_ok=True)
    except UntrustedError:
        raise
    except OSError as exc:
        raise ControlError(f"cannot create the control socket {path}: {_why(exc)}") from exc


def bind_control(path: str) -> socket.socket:
    """Create the listening control socket (0600, in a directory we make 0700).

    Raises:
        UntrustedError: the default control directory is not ours.
        ControlError: the path is too long, or cannot be created or bound
            (one line naming it).
    """
    prepare_control_dir(path)
    try:
        return _bind(path)
    except OSError as exc:
        raise ControlError(f"cannot create the control socket {path}: {_why(exc)}") from exc


def _why(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise ControlError(
                f"another supervisor already answers on {path}; use --control to pick another path"
            )
        finally:
            probe.close()
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _line_waiting(fd: int, reader: asyncio.StreamReader) -> bool:
    """True if a whole request line waits unread: in ``reader``'s buffer, or in
    the kernel on ``fd``."""
    if b"\n" in getattr(reader, "_buffer", b""):
        return True
    peek = socket.socket(fileno=fd)
    try:
        return b"\n" in peek.recv(MAX_REQUEST, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    finally:
        peek.detach()


class ControlServer:
    """Serves the control socket on the supervisor's event loop.

    Every connection is bounded: a peer of another uid is refused at once;
    a request must arrive within ``read_timeout``; at most ``max_reading``
    connections may be sending their request (the oldest is dropped past
    it) and ``max_connections`` be open in all.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        allowed_uids: Collection[int] | None = None,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_reading: int = MAX_READING,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.sock = sock
        self._handler = handler
        self._allowed = allowed_uids
        self._read_timeout = read_timeout
        self._max_reading = max_reading
        self._max_connections = max_connections
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # insertion order: oldest first; each with its socket's fd, to peek at
        self._reading: dict[asyncio.Task[None], tuple[int, asyncio.StreamReader]] = {}
        self._evicted: set[asyncio.Task[None]] = set()
        self.dropped = 0
        """Connections closed for a missed deadline, eviction or "busy"."""

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self.sock, limit=MAX_REQUEST
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            if len(self._handlers) > self._max_connections:
                self.dropped += 1
                await _reply(
                    writer,
                    {"ok": False, "busy": True, "message": "busy: too many control connections"},
                )
                return
            peer = writer.get_extra_info("socket")
            try:
                check_peer(peer, self._allowed)
            except PeerDeniedError as exc:
                # "refused" lets the client exit with its own status (not a rollback's).
                await _reply(writer, {"ok": False, "refused": True, "message": str(exc)})
                return
            try:
                line = await self._read_request(task, reader, peer.fileno())
                if line is None:
                    return
                request = parse_request(line)
            except (ValueError, ControlError) as exc:  # ValueError: a line over the limit
                await _reply(writer, {"ok": False, "message": f"bad request: {exc}"})
                return
            reply = await self._handler(request)
            await _reply(writer, reply.body)
            if reply.after is not None:
                reply.after()  # e.g. re-exec, once the answer is on its way
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _read_request(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, fd: int
    ) -> bytes | None:
        """The request line, or None if the peer missed its deadline or was
        evicted by newer connections."""
        self._reading[task] = (fd, reader)
        while len(self._reading) > self._max_reading:
            # The oldest that has not sent a whole line: a client whose request
            # waits unread (the loop was busy when a burst of them connected)
            # is not a flooder, and is read on the next turn of the loop.
            oldest = next((t for t, w in self._reading.items() if not _line_waiting(*w)), None)
            if oldest is None:
                break
            del self._reading[oldest]
            self._evicted.add(oldest)
            oldest.cancel()
        try:
            async with asyncio.timeout(self._read_timeout):
                return await reader.readline()
        except TimeoutError:
            self.dropped += 1
            return None
        except asyncio.CancelledError:
            if task not in self._evicted:
                raise  # shutting down
            self._evicted.discard(task)
            task.uncancel()
            self.dropped += 1
            return None
        finally:
            self._reading.pop(task, None)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop accepting, let answers being written finish, then close."""
        if self._server is not None:
            self._server.close()
        pending = [t for t in self._handlers if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=timeout)
        self.sock.close()


async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write(json.dumps(response).encode() + b"\n")
    await writer.drain()


def _connect(sock: socket.socket, path: str, timeout: float | None) -> None:
    """``connect``, waiting while the listen backlog is full: on a socket with a
    timeout, ``AF_UNIX`` says EAGAIN at once instead of waiting (a flood of
    other clients must delay us, not fail us)."""
    deadline = time.monotonic() + (CONNECT_WAIT if timeout is None else timeout)
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: its listen backlog stayed full") from None
            time.sleep(0.01)


def request(path: str, cmd: str, *, timeout: float | None = None, **extra: Any) -> dict[str, Any]:
    """Send one command to a supervisor and return its answer.

    Only a supervisor running as our own uid is believed (``SO_PEERCRED``):
    whoever else answers on the path could say anything. In the default
    control directory, the directory is checked first.

    Raises:
        ControlError: no supervisor there, or the connection broke.
        UntrustedError: the control directory or the socket's peer is not ours.
        PeerDeniedError: the supervisor refused us for our uid.
    """
    check_path_length(path)
    if is_default(path):
        check_private_dir(os.path.dirname(os.path.abspath(path)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(
                f"no supervisor answers on {path} ({exc.strerror}); is `nodrop run` running, "
                "and is this its --control path?"
            ) from exc
        except PermissionError as exc:
            raise PeerDeniedError(f"not allowed to use {path}: {exc.strerror}") from exc
        peer = peer_credentials(sock)
        if peer.uid != os.geteuid():
            raise UntrustedError(
                f"the control socket {path} is served by pid {peer.pid} of uid {peer.uid}, "
                f"not by us (uid {os.geteuid()}): refusing to believe its answer"
            )
        sock.sendall(json.dumps({"cmd": cmd, **extra}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > 16 * 1024 * 1024:
                raise ControlError("answer too large")
    except TimeoutError as exc:
        raise ControlError(f"{cmd}: no answer from {path} within {timeout}s") from exc
    except (PeerDeniedError, UntrustedError):
        raise
    except OSError as exc:
        raise ControlError(f"{cmd}: {exc}") from exc
    finally:
        sock.close()
    if not data:
        raise ControlError(f"{cmd}: the supervisor closed the connection without answering")
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"{cmd}: garbled answer") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"{cmd}: garbled answer")
    if answer.get("refused") is True:
        raise PeerDeniedError(f"{path}: {answer.get('message')}")
    if answer.get("busy") is True:  # an error (exit 2), not a rollback (exit 1)
        raise ControlError(f"{cmd}: {path}: {answer.get('message')}; try again")
    return answer
