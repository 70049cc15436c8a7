"""Raw per-attempt samples of one worker, and their wire form between processes.

A worker records, for every attempt, its start (``time.monotonic()``), its
latency and its :class:`~nodrop.load.outcome.Outcome`; and for every lost
kept-alive connection, when and why. Raw samples (17 bytes an attempt) are
kept rather than histograms because reload windows are only known after the
run. The wire form is a JSON header line followed by the packed arrays;
encoding and decoding are pure.
"""

from __future__ import annotations

import array
import dataclasses
import json

from nodrop.errors import ProtocolError

#: Reconnect cause code for "the server closed a kept connection cleanly".
CLEAN_CLOSE = 255


@dataclasses.dataclass
class Samples:
    """What one worker saw. Arrays are parallel.

    Attributes:
        starts: attempt start times (monotonic seconds).
        latencies: attempt durations (seconds), to success or failure.
        outcomes: :class:`Outcome` values.
        reconnect_times: when a kept connection was found lost.
        reconnect_causes: the failing :class:`Outcome` value, or
            :data:`CLEAN_CLOSE` when the server closed it cleanly.
        cpu_seconds: CPU time the worker used during the run.
        wall_seconds: wall time the worker ran.
    """

    starts: array.array[float] = dataclasses.field(default_factory=lambda: array.array("d"))
    latencies: array.array[float] = dataclasses.field(default_factory=lambda: array.array("d"))
    outcomes: array.array[int] = dataclasses.field(default_factory=lambda: array.array("B"))
    reconnect_times: array.array[float] = dataclasses.field(
        default_factory=lambda: array.array("d")
    )
    reconnect_causes: array.array[int] = dataclasses.field(default_factory=lambda: array.array("B"))
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.starts)

    def extend(self, other: Samples) -> None:
        """Append another worker's samples (CPU and wall times add up)."""
        self.starts.extend(other.starts)
        self.latencies.extend(other.latencies)
        self.outcomes.extend(other.outcomes)
        self.reconnect_times.extend(other.reconnect_times)
        self.reconnect_causes.extend(other.reconnect_causes)
        self.cpu_seconds += other.cpu_seconds
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)


def encode(samples: Samples) -> bytes:
    """Serialize samples: a JSON header line, then the arrays' bytes."""
    header = {
        "attempts": len(samples.starts),
        "reconnects": len(samples.reconnect_times),
        "cpu_seconds": samples.cpu_seconds,
        "wall_seconds": samples.wall_seconds,
    }
    parts = [json.dumps(header).encode() + b"\n"]
    for arr in (
        samples.starts,
        samples.latencies,
        samples.outcomes,
        samples.reconnect_times,
        samples.reconnect_causes,
    ):
        parts.append(arr.tobytes())
    return b"".join(parts)


def decode(data: bytes) -> Samples:
    """Parse :func:`encode` output.

    Raises:
        ProtocolError: the bytes are truncated or not a samples frame.
    """
    line, sep, rest = data.partition(b"\n")
    if not sep:
        raise ProtocolError("samples frame has no header line")
    try:
        header = json.loads(line)
        n = int(header["attempts"])
        m = int(header["reconnects"])
        cpu = float(header["cpu_seconds"])
        wall = float(header["wall_seconds"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"bad samples header: {exc}") from exc
    if n < 0 or m < 0 or len(rest) != 17 * n + 9 * m:
        raise ProtocolError(f"samples frame is {len(rest)} bytes, want {17 * n + 9 * m}")
    out = Samples(cpu_seconds=cpu, wall_seconds=wall)
    offset = 0
    for arr, count in (
        (out.starts, n),
        (out.latencies, n),
        (out.outcomes, n),
        (out.reconnect_times, m),
        (out.reconnect_causes, m),
    ):
        size = count * arr.itemsize
        arr.frombytes(rest[offset : offset + size])
        offset += size
    return out
