"""Failure classes, and what each client reports (pure: no I/O).

A *failure* is a request (or WebSocket session) that steady-state operation
would have completed. A *reconnect* is a new connection the client opened
because the server told it to (``Connection: close`` on the previous
response; a WebSocket closed with 1012 "Service Restart"): not a failure,
but counted, since each one costs a handshake.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_SAMPLES = 40
"""Failures kept in full per client (the counts are always complete)."""


class Failure(enum.Enum):
    REFUSED = "refused"
    """connect() refused: nothing listened."""
    RESET = "reset"
    """The connection was reset (or the pipe broke) before a response started."""
    EOF = "eof"
    """The server closed the connection before any response, on a connection it
    had not marked closing."""
    TIMEOUT = "timeout"
    """No answer within the client's deadline."""
    HTTP_5XX = "5xx"
    BAD_STATUS = "bad-status"
    """A status that is neither 2xx nor 5xx (the apps never send one)."""
    STREAM_TRUNCATED = "stream-truncated"
    """``/stream`` started but did not deliver all of its events."""
    ECHO_BAD = "echo-bad"
    """``/echo`` answered with a body that is not the upload, or a truncated one."""
    WS_CLOSED = "ws-closed"
    """A WebSocket session closed with a code other than 1012 (Service Restart)."""
    WS_RESET = "ws-reset"
    """A WebSocket session ended with no close frame (TCP close or reset)."""
    WS_HANDSHAKE = "ws-handshake"
    """A WebSocket handshake refused, reset or answered with an error status."""
    WS_ECHO_BAD = "ws-echo-bad"
    """A WebSocket message answered with the wrong text."""
    PROTOCOL = "protocol"
    """Anything else the client could not parse or did not expect."""


@dataclass(frozen=True)
class FailureRecord:
    kind: Failure
    at: float
    """Seconds since the client started."""
    what: str
    """Endpoint (``GET /slow``, ``ws``)."""
    detail: str
    generation: str = "?"
    """Generation of the previous response on the same connection ("?" if none)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "at": round(self.at, 3),
            "what": self.what,
            "detail": self.detail,
            "generation": self.generation,
        }


@dataclass
class ClientReport:
    """What one client saw over one cell (thread-safe to fill)."""

    client: str
    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    samples: list[FailureRecord] = field(default_factory=list)
    reconnects: int = 0
    """New connections the server asked for (Connection: close, WebSocket 1012)."""
    extra: Counter[str] = field(default_factory=Counter)
    """Client-specific counts (hidden retries, silent reconnects, ...)."""
    generations: Counter[str] = field(default_factory=Counter)
    """Responses per generation that answered."""
    error: str | None = None
    """The client itself could not run (not a failure of the server)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def succeeded(self, generation: str) -> None:
        with self._lock:
            self.ok += 1
            self.generations[generation] += 1

    def fail(self, kind: Failure, what: str, detail: str, generation: str = "?") -> None:
        with self._lock:
            self.failures[kind.value] += 1
            if len(self.samples) < MAX_SAMPLES:
                record = FailureRecord(
                    kind, time.monotonic() - self.started, what, detail[:300], generation
                )
                self.samples.append(record)

    def reconnected(self) -> None:
        with self._lock:
            self.reconnects += 1

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.extra[name] += n

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "ok": self.ok,
            "failed": self.failed,
            "failures": dict(self.failures),
            "reconnects": self.reconnects,
            "extra": dict(self.extra),
            "generations": dict(self.generations),
            "samples": [s.to_dict() for s in self.samples],
            "error": self.error,
        }

    def describe(self) -> str:
        """One line per failure sample, for an assertion message."""
        lines = [
            f"{self.client}: {self.ok} ok, {self.failed} failed {dict(self.failures)}, "
            f"{self.reconnects} reconnects {dict(self.extra) or ''}".rstrip()
        ]
        if self.error:
            lines.append(f"  client error: {self.error}")
        lines += [
            f"  t={s.at:7.3f}s {s.kind.value:<16} {s.what:<10} gen={s.generation} {s.detail}"
            for s in self.samples
        ]
        if self.failed > len(self.samples):
            lines.append(f"  ... {self.failed - len(self.samples)} more")
        return "\n".join(lines)
