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
from collections.abc import Awaitable, Callable, Collection
from typing import Any, cast

from nodrop.errors import ControlError, PeerDeniedError
from nodrop.kernel.fdpass import check_peer
from nodrop.supervisor.api import ControlRequest, Reply

MAX_REQUEST = 64 * 1024
COMMANDS = ("reload", "status", "stop", "reexec")

Handler = Callable[[ControlRequest], Awaitable[Reply]]


def default_control_path(name: str = "nodrop") -> str:
    """Where the control socket lives unless ``--control`` says otherwise.

    ``$NODROP_CONTROL`` if set; else ``$XDG_RUNTIME_DIR/nodrop/NAME.sock``;
    else ``/run/nodrop/NAME.sock`` for root; else ``/tmp/nodrop-UID/NAME.sock``.
    """
    explicit = os.environ.get("NODROP_CONTROL")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        base = os.path.join(runtime, "nodrop")
    elif os.geteuid() == 0:
        base = "/run/nodrop"
    else:
        base = f"/tmp/nodrop-{os.geteuid()}"
    return os.path.join(base, f"{name}.sock")


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


def bind_control(path: str) -> socket.socket:
    """Create the listening control socket (0600, in a directory we make 0700)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
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


class ControlServer:
    """Serves the control socket on the supervisor's event loop."""

    def __init__(
        self, sock: socket.socket, handler: Handler, allowed_uids: Collection[int] | None = None
    ) -> None:
        self.sock = sock
        self._handler = handler
        self._allowed = allowed_uids
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self.sock, limit=MAX_REQUEST
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            peer = writer.get_extra_info("socket")
            try:
                check_peer(peer, self._allowed)
            except PeerDeniedError as exc:
                await _reply(writer, {"ok": False, "message": str(exc)})
                return
            try:
                line = await reader.readline()
                request = parse_request(line)
            except (ValueError, ControlError) as exc:  # ValueError: line over the limit
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


def request(path: str, cmd: str, *, timeout: float | None = None, **extra: Any) -> dict[str, Any]:
    """Send one command to a supervisor and return its answer.

    Raises:
        ControlError: no supervisor there, or the connection broke.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(
                f"no supervisor answers on {path} ({exc.strerror}); is `nodrop run` running, "
                "and is this its --control path?"
            ) from exc
        except PermissionError as exc:
            raise ControlError(f"not allowed to use {path}: {exc.strerror}") from exc
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
    return answer
