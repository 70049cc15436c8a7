"""The options of a load run: one frozen dataclass and the mode enum."""

from __future__ import annotations

import dataclasses
import enum
import os

from nodrop.errors import ConfigError

#: Concurrent attempts in flight, over all worker processes.
DEFAULT_CONCURRENCY = 32
#: How long a run lasts (seconds).
DEFAULT_DURATION = 10.0
#: Hard cap on attempts over the whole run, whatever the duration.
DEFAULT_MAX_REQUESTS = 10_000_000
#: Deadline of one attempt, connect plus response (seconds).
DEFAULT_TIMEOUT = 2.0
#: The request target in the HTTP modes.
DEFAULT_PATH = "/"
#: The line sent in TCP mode (a newline is appended).
DEFAULT_TCP_LINE = "ping"
#: How long the runner waits for workers beyond duration + timeout (seconds).
DEFAULT_WORKER_GRACE = 10.0


class Mode(enum.Enum):
    """How each attempt uses the network."""

    CLOSE = "close"
    """A new TCP connection per request, ``Connection: close``."""
    KEEPALIVE = "keepalive"
    """Each worker keeps one HTTP/1.1 connection, reconnecting after a failure."""
    TCP = "tcp"
    """Raw TCP, a new connection per attempt: send a line, read a line."""


def default_processes() -> int:
    """One worker process per core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """What to load, how hard, how long, and when to reload.

    Attributes:
        host: target address; loopback only is the caller's responsibility.
        port: target TCP port.
        mode: see :class:`Mode`.
        concurrency: attempts in flight over all processes.
        duration: seconds the run lasts (no new attempt starts after).
        max_requests: attempts over the whole run; split evenly over processes.
        timeout: deadline of one attempt (connect + full response), seconds.
        processes: worker processes; ``None`` means one per core.
        path: HTTP request target.
        tcp_line: the line sent in TCP mode.
        reload_every: seconds between reloads (the first after this long).
        reloads: how many reloads the runner triggers (0: none).
    """

    host: str
    port: int
    mode: Mode = Mode.KEEPALIVE
    concurrency: int = DEFAULT_CONCURRENCY
    duration: float = DEFAULT_DURATION
    max_requests: int = DEFAULT_MAX_REQUESTS
    timeout: float = DEFAULT_TIMEOUT
    processes: int | None = None
    path: str = DEFAULT_PATH
    tcp_line: str = DEFAULT_TCP_LINE
    reload_every: float = 0.0
    reloads: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port out of range: {self.port}")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.duration <= 0 or self.timeout <= 0:
            raise ConfigError("duration and timeout must be > 0")
        if self.max_requests < 1:
            raise ConfigError("max_requests must be >= 1")
        if self.processes is not None and self.processes < 1:
            raise ConfigError("processes must be >= 1")
        if self.reloads < 0 or (self.reloads and self.reload_every <= 0):
            raise ConfigError("reloads need reload_every > 0")
        if not self.path.startswith("/"):
            raise ConfigError(f"path must start with '/': {self.path!r}")
        if "\n" in self.tcp_line or "\r" in self.tcp_line:
            raise ConfigError("tcp_line must be a single line")

    def effective_processes(self) -> int:
        """Worker processes actually used: never more than ``concurrency``."""
        wanted = self.processes if self.processes is not None else default_processes()
        return min(wanted, self.concurrency)
