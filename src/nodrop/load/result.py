"""The result of a load run: frozen dataclasses and their JSON form."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from nodrop.load.config import LoadConfig
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord


@dataclasses.dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles of successful attempts, in seconds (``None`` if none).

    Percentiles come from a log-bucketed histogram within
    ``relative_error`` of the exact value; ``max`` is exact.
    """

    count: int
    p50: float | None
    p99: float | None
    p999: float | None
    max: float | None
    relative_error: float


@dataclasses.dataclass(frozen=True)
class Second:
    """One second of the timeline, by attempt completion time.

    Attributes:
        t: seconds since the run started (this bin is [t, t+1)).
        attempts: attempts that ended in this second.
        outcomes: count per outcome label (``ok`` included).
        p99: p99 latency of the successful ones, seconds.
    """

    t: int
    attempts: int
    outcomes: Mapping[str, int]
    p99: float | None

    @property
    def errors(self) -> int:
        """Attempts that did not succeed."""
        return self.attempts - self.outcomes.get(Outcome.OK.label, 0)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A short stretch of time around a reload window (see :data:`FINE_BUCKET`).

    Attributes:
        t: seconds since the run started (this bucket is [t, t + width)).
        width: seconds.
        attempts, outcomes, p99: as in :class:`Second`.
    """

    t: float
    width: float
    attempts: int
    outcomes: Mapping[str, int]
    p99: float | None

    @property
    def errors(self) -> int:
        return self.attempts - self.outcomes.get(Outcome.OK.label, 0)


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """Everything a run measured.

    Attributes:
        config: what was asked.
        processes: worker processes used.
        started: monotonic start of the run. ended: monotonic end (last
            attempt's end, or the planned end if later).
        outcomes: count per outcome label, over the whole run.
        outcomes_in_reload: the same, for attempts overlapping a reload window.
        overall, steady, reload: latency of successful attempts: all of them,
            those overlapping no reload window, those overlapping one.
        reconnects: kept connections lost (keepalive mode).
        reconnects_in_reload: those lost inside a reload window.
        reconnect_causes: count per cause (an outcome label, or ``clean_close``).
        timeline: one :class:`Second` per second of the run.
        reloads: what each reload did.
        generator_cpu: the workers' CPU seconds / (wall seconds x processes):
            near 1.0 means the generator itself was saturated.
    """

    config: LoadConfig
    processes: int
    started: float
    ended: float
    outcomes: Mapping[str, int]
    outcomes_in_reload: Mapping[str, int]
    overall: LatencySummary
    steady: LatencySummary
    reload: LatencySummary
    reconnects: int
    reconnects_in_reload: int
    reconnect_causes: Mapping[str, int]
    timeline: tuple[Second, ...]
    reloads: tuple[ReloadRecord, ...]
    generator_cpu: float
    fine: tuple[Bucket, ...] = ()
    """100 ms buckets covering each reload window and half a second either
    side: what one-second bins average away."""

    @property
    def attempts(self) -> int:
        """Attempts made."""
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        """Attempts that succeeded."""
        return self.outcomes.get(Outcome.OK.label, 0)

    @property
    def failed(self) -> int:
        """Attempts that did not succeed."""
        return self.attempts - self.ok

    @property
    def failed_per_million(self) -> float:
        """Failures per 10^6 attempts (0.0 for an empty run)."""
        return 1e6 * self.failed / self.attempts if self.attempts else 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from start to end."""
        return max(self.ended - self.started, 1e-9)

    @property
    def achieved_rate(self) -> float:
        """The generator's own rate: attempts per second over the run."""
        return self.attempts / self.elapsed

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form (latencies in seconds)."""
        config = dataclasses.asdict(self.config)
        config["mode"] = self.config.mode.value
        return {
            "config": config,
            "processes": self.processes,
            "started": self.started,
            "ended": self.ended,
            "elapsed": self.elapsed,
            "attempts": self.attempts,
            "ok": self.ok,
            "failed": self.failed,
            "failed_per_million": self.failed_per_million,
            "achieved_rate": self.achieved_rate,
            "generator_cpu": self.generator_cpu,
            "outcomes": dict(self.outcomes),
            "outcomes_in_reload": dict(self.outcomes_in_reload),
            "latency": {
                "overall": dataclasses.asdict(self.overall),
                "steady": dataclasses.asdict(self.steady),
                "reload": dataclasses.asdict(self.reload),
            },
            "reconnects": self.reconnects,
            "reconnects_in_reload": self.reconnects_in_reload,
            "reconnect_causes": dict(self.reconnect_causes),
            "timeline": [
                {"t": s.t, "attempts": s.attempts, "outcomes": dict(s.outcomes), "p99": s.p99}
                for s in self.timeline
            ],
            "reloads": [r.to_dict() | {"window": list(r.window)} for r in self.reloads],
            "fine": [
                {
                    "t": b.t,
                    "width": b.width,
                    "attempts": b.attempts,
                    "outcomes": dict(b.outcomes),
                    "p99": b.p99,
                }
                for b in self.fine
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The :meth:`to_dict` form as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)
