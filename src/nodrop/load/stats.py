"""Turn raw samples and reload records into a :class:`LoadResult`. Pure code.

An attempt belongs to a reload window when its interval [start, end]
overlaps the window: a request that began before the reload and finished
during it was exposed to it. A lost kept connection belongs to a window
when the moment it was found lost falls inside it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence

from nodrop.load.config import LoadConfig
from nodrop.load.histogram import Histogram
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord
from nodrop.load.result import Bucket, LatencySummary, LoadResult, Second
from nodrop.load.samples import CLEAN_CLOSE, Samples

#: Label of the reconnect cause "the server closed the kept connection cleanly".
CLEAN_CLOSE_LABEL = "clean_close"

_LABELS = [o.label for o in Outcome]

#: Width of the fine buckets around reload windows (seconds), and how far
#: before and after each window they reach.
FINE_BUCKET = 0.1
FINE_MARGIN = 0.5


def merge_windows(windows: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sort windows and merge the overlapping ones."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class WindowIndex:
    """Answers "does [a, b] overlap any window?" in O(log n).

    Args:
        windows: (start, end) pairs, any order, may overlap.
    """

    def __init__(self, windows: Iterable[tuple[float, float]]) -> None:
        merged = merge_windows(windows)
        self._starts = [w[0] for w in merged]
        self._ends = [w[1] for w in merged]

    def overlaps(self, start: float, end: float) -> bool:
        """Whether the closed interval [start, end] meets a window."""
        # The last window starting at or before `end` is the only candidate.
        i = bisect.bisect_right(self._starts, end) - 1
        return i >= 0 and self._ends[i] >= start

    def contains(self, t: float) -> bool:
        """Whether the instant ``t`` is inside a window."""
        return self.overlaps(t, t)


def summarize_latency(hist: Histogram) -> LatencySummary:
    """Percentiles of one histogram."""
    return LatencySummary(
        count=hist.count,
        p50=hist.percentile(50),
        p99=hist.percentile(99),
        p999=hist.percentile(99.9),
        max=hist.max if hist.count else None,
        relative_error=hist.relative_error,
    )


def summarize(
    config: LoadConfig,
    samples: Samples,
    reloads: Sequence[ReloadRecord],
    *,
    started: float,
    ended: float,
    processes: int,
) -> LoadResult:
    """Compute every statistic of a run.

    Args:
        config: the run's options.
        samples: every worker's samples, concatenated.
        reloads: the reloads done during the run.
        started: monotonic start of the run (time 0 of the timeline).
        ended: monotonic planned end of the run; used as the end only when
            there are no samples (else the last attempt's end is).
        processes: worker processes used.
    """
    index = WindowIndex(r.window for r in reloads)
    overall, steady, reload = Histogram(), Histogram(), Histogram()
    outcomes: Counter[str] = Counter({label: 0 for label in _LABELS})
    in_reload: Counter[str] = Counter({label: 0 for label in _LABELS})
    per_second: dict[int, Counter[str]] = {}
    per_second_hist: dict[int, Histogram] = {}
    fine_index = WindowIndex(
        (r.window[0] - FINE_MARGIN, r.window[1] + FINE_MARGIN) for r in reloads
    )
    per_bucket: dict[int, Counter[str]] = {}
    per_bucket_hist: dict[int, Histogram] = {}
    last_end = started if len(samples) else ended
    last_second = max(0, math.ceil(ended - started) - 1)
    ok = int(Outcome.OK)
    for start, latency, code in zip(
        samples.starts, samples.latencies, samples.outcomes, strict=True
    ):
        end = start + latency
        last_end = max(last_end, end)
        label = _LABELS[code]
        outcomes[label] += 1
        exposed = index.overlaps(start, end)
        if exposed:
            in_reload[label] += 1
        # Attempts in flight at the planned end land in the last second.
        second = min(max(0, math.floor(end - started)), last_second)
        per_second.setdefault(second, Counter())[label] += 1
        if code == ok:
            overall.add(latency)
            (reload if exposed else steady).add(latency)
            per_second_hist.setdefault(second, Histogram()).add(latency)
        if fine_index.contains(end):
            bucket = math.floor((end - started) / FINE_BUCKET)
            per_bucket.setdefault(bucket, Counter())[label] += 1
            if code == ok:
                per_bucket_hist.setdefault(bucket, Histogram()).add(latency)
    timeline = tuple(
        Second(
            t=t,
            attempts=sum(per_second.get(t, Counter()).values()),
            outcomes=dict(per_second.get(t, Counter())),
            p99=per_second_hist[t].percentile(99) if t in per_second_hist else None,
        )
        for t in range(last_second + 1)
    )
    fine = tuple(
        Bucket(
            t=round(b * FINE_BUCKET, 6),
            width=FINE_BUCKET,
            attempts=sum(per_bucket[b].values()),
            outcomes=dict(per_bucket[b]),
            p99=per_bucket_hist[b].percentile(99) if b in per_bucket_hist else None,
        )
        for b in sorted(per_bucket)
    )
    causes: Counter[str] = Counter()
    reconnects_in_reload = 0
    for when, cause in zip(samples.reconnect_times, samples.reconnect_causes, strict=True):
        causes[CLEAN_CLOSE_LABEL if cause == CLEAN_CLOSE else _LABELS[cause]] += 1
        reconnects_in_reload += index.contains(when)
    busy = samples.cpu_seconds / (max(samples.wall_seconds, 1e-9) * max(processes, 1))
    return LoadResult(
        config=config,
        processes=processes,
        started=started,
        ended=last_end,
        outcomes=dict(outcomes),
        outcomes_in_reload=dict(in_reload),
        overall=summarize_latency(overall),
        steady=summarize_latency(steady),
        reload=summarize_latency(reload),
        reconnects=len(samples.reconnect_times),
        reconnects_in_reload=reconnects_in_reload,
        reconnect_causes=dict(causes),
        timeline=timeline,
        reloads=tuple(reloads),
        generator_cpu=busy,
        fine=fine,
    )
