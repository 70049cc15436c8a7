"""Where the latency of a reload goes: requests and CPU split by phase. Pure code.

A reload is cut at the moments the server (or the harness, for nginx and
HAProxy) reports, all in ``time.monotonic()`` seconds:

* ``starting``: from the reload request until the new generation is ready
  -- the new workers boot beside the old ones, which serve alone;
* ``switch``: from ready until the old generation has stopped accepting
  (nodrop's switch-over; empty for tools that do not say);
* ``first``: the first :data:`FIRST_WINDOW` seconds after the switch -- the
  first requests the new workers serve (cold code paths, lazy imports);
* ``drain``: from then until the old generation has exited;
* ``after``: :data:`AFTER_WINDOW` seconds after the old generation exited.

A request belongs to the phase its *start* falls in. The first
:data:`WARMUP` seconds of a run count nowhere: fresh workers serving their
first requests are not the steady state. ``steady`` is every
request that overlaps no reload window at all (the definition of
:mod:`nodrop.load.stats`), and ``window`` every request that overlaps one.
Percentiles are exact (nearest rank on the sorted latencies).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Seconds after the switch counted as the new workers' first requests.
FIRST_WINDOW = 0.2
#: Seconds after the old generation exited, to see whether a tail lingers.
AFTER_WINDOW = 0.5
#: Seconds at the start of a run left out of every figure.
WARMUP = 1.0
PHASES = ("starting", "switch", "first", "drain", "after")


@dataclass(frozen=True)
class ReloadMoments:
    """One reload, cut into phases, and whose processes were whose.

    Attributes:
        started: the reload was requested.
        spawned: the new workers were started (None if unknown).
        ready: the new generation was ready.
        switched: the old one had stopped accepting (``ready`` if unknown).
        old_exited: the old generation had exited.
        new_pids / old_pids: the workers of each generation.
    """

    started: float
    ready: float
    switched: float
    old_exited: float
    spawned: float | None = None
    new_pids: frozenset[int] = frozenset()
    old_pids: frozenset[int] = frozenset()

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Each phase's [start, end) interval."""
        first_end = min(self.switched + FIRST_WINDOW, max(self.old_exited, self.switched))
        return {
            "starting": (self.started, self.ready),
            "switch": (self.ready, self.switched),
            "first": (self.switched, first_end),
            "drain": (first_end, self.old_exited),
            "after": (self.old_exited, self.old_exited + AFTER_WINDOW),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "spawned": self.spawned,
            "ready": self.ready,
            "switched": self.switched,
            "old_exited": self.old_exited,
            "new_pids": sorted(self.new_pids),
            "old_pids": sorted(self.old_pids),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values) / 100 - 1e-9))  # no float spill-over
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Latency:
    """Percentiles of a set of successful requests, seconds."""

    count: int
    p50: float | None
    p99: float | None
    p999: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        ordered = sorted(values)
        return cls(
            len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 99),
            percentile(ordered, 99.9),
            ordered[-1] if ordered else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50": self.p50,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
        }


def split_requests(
    starts: Sequence[float],
    latencies: Sequence[float],
    ok: Sequence[bool],
    reloads: Sequence[ReloadMoments],
    since: float = -math.inf,
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Latencies of the successful requests: steady, in a window, and by phase
    (requests that started before ``since`` -- the run's warm-up -- count nowhere)."""
    windows = sorted((r.started, r.old_exited) for r in reloads)
    win_starts = [w[0] for w in windows]
    steady: list[float] = []
    window: list[float] = []
    cuts: list[tuple[float, float, str]] = sorted(
        (a, b, name) for r in reloads for name, (a, b) in r.bounds().items() if b > a
    )
    cut_starts = [c[0] for c in cuts]
    by_phase: dict[str, list[float]] = {name: [] for name in PHASES}
    for start, latency, good in zip(starts, latencies, ok, strict=True):
        if not good or start < since:
            continue
        end = start + latency
        i = bisect.bisect_right(win_starts, end) - 1
        overlapping = any(
            windows[j][0] <= end and start <= windows[j][1] for j in range(max(0, i - 2), i + 1)
        )
        (window if overlapping else steady).append(latency)
        j = bisect.bisect_right(cut_starts, start) - 1
        for k in range(max(0, j - 4), j + 1):
            a, b, name = cuts[k]
            if a <= start < b:
                by_phase[name].append(latency)
                break
    return steady, window, by_phase


# --- CPU ----------------------------------------------------------------------------


@dataclass
class CpuSeries:
    """Cumulative CPU seconds (utime + stime) of each process, sampled over time."""

    times: list[float] = field(default_factory=list)
    cpu: list[dict[int, float]] = field(default_factory=list)

    def add(self, when: float, by_pid: Mapping[int, float]) -> None:
        self.times.append(when)
        self.cpu.append(dict(by_pid))

    def _at(self, pid: int, when: float) -> float:
        """The pid's cumulative CPU at ``when``: its last sample at or before
        it (0 before its first; its last ever after it is gone)."""
        i = bisect.bisect_right(self.times, when) - 1
        while i >= 0:
            value = self.cpu[i].get(pid)
            if value is not None:
                return value
            i -= 1
        return 0.0

    def used(self, pids: frozenset[int] | set[int], start: float, end: float) -> float:
        """CPU seconds ``pids`` used in [start, end) (to the sampling period)."""
        return sum(max(0.0, self._at(p, end) - self._at(p, start)) for p in pids)

    def pids(self) -> set[int]:
        out: set[int] = set()
        for sample in self.cpu:
            out |= sample.keys()
        return out


def cpu_by_phase(
    series: CpuSeries, reload: ReloadMoments, others: Mapping[str, frozenset[int]]
) -> dict[str, dict[str, float]]:
    """CPU seconds of the new workers, the old ones and each named group
    (the supervisor, the load generator...) in each phase of one reload."""
    out: dict[str, dict[str, float]] = {}
    groups = {"new": reload.new_pids, "old": reload.old_pids, **others}
    for name, (a, b) in reload.bounds().items():
        out[name] = {g: series.used(pids, a, b) for g, pids in groups.items()}
        out[name]["seconds"] = max(0.0, b - a)
    return out


def parse_stat_cpu(text: str, ticks: int) -> float:
    """utime + stime of a ``/proc/PID/stat`` line, in seconds (pure)."""
    fields = text[text.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / ticks


def parse_proc_stat_busy(text: str) -> tuple[float, float]:
    """(busy, total) jiffies of the machine from ``/proc/stat``'s ``cpu`` line (pure)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [float(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0.0)
            total = sum(values[:8])
            return total - idle, total
    raise ValueError("no cpu line in /proc/stat")
