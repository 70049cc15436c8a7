"""A tiny load generator for the holder and upgrader tests: a new TCP
connection per request (send a line, read a line), several threads, every
attempt timed and classified. Bounded in time and count."""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Attempt:
    start: float
    latency: float
    outcome: str  # ok | refused | reset | timeout | other:...
    reply: bytes = b""


def _classify(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return f"other:{exc.errno}"


@dataclass
class Load:
    host: str
    port: int
    threads: int = 4
    timeout: float = 10.0
    max_attempts: int = 500_000
    max_seconds: float = 120.0
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            if len(self.attempts) >= self.max_attempts:
                return
            start = time.monotonic()
            reply = b""
            try:
                with socket.create_connection((self.host, self.port), timeout=self.timeout) as s:
                    s.sendall(b"ping\n")
                    while not reply.endswith(b"\n"):
                        chunk = s.recv(256)
                        if not chunk:
                            break
                        reply += chunk
                outcome = "ok" if reply.endswith(b"\n") else "reset"
            except OSError as exc:
                outcome = _classify(exc)
            with self._lock:
                self.attempts.append(Attempt(start, time.monotonic() - start, outcome, reply))

    def ok_count(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "ok")

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout + 5)

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.attempts:
            if a.outcome != "ok":
                out[a.outcome] = out.get(a.outcome, 0) + 1
        return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
