"""One worker process: an asyncio loop running its share of the attempts.

The runner starts ``python -m nodrop.load.worker``, writes a
:class:`WorkerSpec` as one JSON line on its stdin, waits for the byte
``R`` (imported and ready), then writes ``GO <start_at> <stop_at>`` and
reads the encoded :class:`~nodrop.load.samples.Samples` from its stdout
until EOF. The instants are ``time.monotonic()`` values, which every
process on the machine shares, so all workers start together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time

from nodrop.load.client import (
    KeptConnection,
    http_close_attempt,
    resolve,
    tcp_line_attempt,
)
from nodrop.load.config import Mode
from nodrop.load.http import build_request
from nodrop.load.outcome import Outcome
from nodrop.load.samples import CLEAN_CLOSE, Samples, encode

#: The byte a worker writes once it is ready to start.
READY = b"R"
#: The word starting the line ``GO <start_at> <stop_at>`` that starts a worker.
GO = b"GO"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One worker's share of a run.

    Attributes:
        host: target host. port: target port. mode: a :class:`Mode` value.
        concurrency: tasks in this worker.
        max_requests: attempts this worker may start.
        timeout: per-attempt deadline (seconds).
        path: HTTP target. tcp_line: TCP-mode line.
        start_at: monotonic instant to start (waits until then).
        stop_at: monotonic instant after which no attempt starts.
    """

    host: str
    port: int
    mode: str
    concurrency: int
    max_requests: int
    timeout: float
    path: str
    tcp_line: str
    start_at: float
    stop_at: float

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json` output."""
        return cls(**json.loads(text))


class _Budget:
    """Shared by a worker's tasks (one thread: no lock needed)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.left = spec.max_requests
        self.stop_at = spec.stop_at

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.stop_at:
            return False
        self.left -= 1
        return True


async def _close_task(spec: WorkerSpec, budget: _Budget, out: Samples) -> None:
    family, addr = resolve(spec.host, spec.port)
    request = build_request(spec.host, spec.port, spec.path, keep_alive=False)
    while budget.take():
        start = time.monotonic()
        outcome, end = await http_close_attempt(family, addr, request, spec.timeout)
        _record(out, start, end, outcome)


async def _tcp_task(spec: WorkerSpec, budget: _Budget, out: Samples) -> None:
    family, addr = resolve(spec.host, spec.port)
    line = spec.tcp_line.encode() + b"\n"
    while budget.take():
        start = time.monotonic()
        outcome = await tcp_line_attempt(family, addr, line, spec.timeout)
        _record(out, start, time.monotonic(), outcome)


async def _keepalive_task(spec: WorkerSpec, budget: _Budget, out: Samples) -> None:
    family, addr = resolve(spec.host, spec.port)
    request = build_request(spec.host, spec.port, spec.path, keep_alive=True)
    conn = KeptConnection(family, addr, request, spec.timeout)
    try:
        while budget.take():
            start = time.monotonic()
            outcome = await conn.attempt()
            _record(out, start, time.monotonic(), outcome)
    finally:
        conn.close()
        for when, cause in conn.lost:
            out.reconnect_times.append(when)
            out.reconnect_causes.append(CLEAN_CLOSE if cause is None else int(cause))


def _record(out: Samples, start: float, end: float, outcome: Outcome) -> None:
    out.starts.append(start)
    out.latencies.append(end - start)
    out.outcomes.append(outcome)


_TASKS = {
    Mode.CLOSE: _close_task,
    Mode.KEEPALIVE: _keepalive_task,
    Mode.TCP: _tcp_task,
}


async def run_worker(spec: WorkerSpec) -> Samples:
    """Run this worker's share in the current event loop and return its samples."""
    delay = spec.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)  # a scheduled start shared with the other workers
    out = Samples()
    budget = _Budget(spec)
    task = _TASKS[Mode(spec.mode)]
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(task(spec, budget, out) for _ in range(spec.concurrency)))
    out.cpu_seconds = time.process_time() - cpu0
    out.wall_seconds = time.monotonic() - wall0
    return out


def main() -> int:
    """Process entry: spec on stdin, handshake, samples on stdout."""
    spec = WorkerSpec.from_json(sys.stdin.buffer.readline().decode())
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    go = sys.stdin.buffer.readline().split()
    if len(go) != 3 or go[0] != GO:
        return 1  # the runner gave up before the start
    spec = dataclasses.replace(spec, start_at=float(go[1]), stop_at=float(go[2]))
    samples = asyncio.run(run_worker(spec))
    sys.stdout.buffer.write(encode(samples))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
