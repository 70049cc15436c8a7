"""A log-bucketed latency histogram: mergeable, bounded memory, known error.

Values (seconds) fall into buckets whose bounds grow geometrically by
``g = (1 + e) / (1 - e)`` with ``e = DEFAULT_RELATIVE_ERROR``; a percentile
is reported as ``2 * high / (g + 1)`` of its bucket, so it is within ``e``
(relative) of a value that really is in that bucket -- i.e. of the exact
order statistic. Values below ``DEFAULT_FLOOR`` share the first bucket and
are reported as ``DEFAULT_FLOOR`` (an absolute error of at most that).
Min and max are tracked exactly. Histograms with the same parameters merge
by adding counts, so each worker process can build its own.

The "rank" convention: percentile ``q`` is the smallest recorded value
``v`` with at least ``ceil(q/100 * n)`` values ``<= v`` (nearest-rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: Relative error bound of every reported percentile (0.5%).
DEFAULT_RELATIVE_ERROR = 0.005
#: Values below this (seconds) are not distinguished: 1 microsecond.
DEFAULT_FLOOR = 1e-6


class Histogram:
    """Counts of latencies in geometric buckets.

    Args:
        relative_error: the bound on a percentile's relative error.
        floor: values below this land in bucket 0.
    """

    __slots__ = ("_counts", "_floor", "_log_base", "count", "max", "min", "relative_error")

    def __init__(
        self, relative_error: float = DEFAULT_RELATIVE_ERROR, floor: float = DEFAULT_FLOOR
    ) -> None:
        if not 0 < relative_error < 0.5:
            raise ValueError("relative_error must be in (0, 0.5)")
        if floor <= 0:
            raise ValueError("floor must be positive")
        self.relative_error = relative_error
        self._floor = floor
        # Bucket i (i >= 1) holds [floor * g**(i-1), floor * g**i) with
        # g = (1 + e) / (1 - e), as in DDSketch (Masson et al., VLDB 2019).
        self._log_base = math.log((1 + relative_error) / (1 - relative_error))
        self._counts: dict[int, int] = {}
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def _index(self, value: float) -> int:
        if value < self._floor:
            return 0
        return int(math.log(value / self._floor) / self._log_base) + 1

    def _value(self, index: int) -> float:
        if index == 0:
            return self._floor
        # The DDSketch estimate 2*high/(g+1): within e of both bucket ends.
        gamma = math.exp(self._log_base)
        high = self._floor * math.exp(index * self._log_base)
        return 2 * high / (gamma + 1)

    def add(self, value: float) -> None:
        """Record one value (seconds; negative values count as 0)."""
        value = max(value, 0.0)
        index = self._index(value)
        self._counts[index] = self._counts.get(index, 0) + 1
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def extend(self, values: Iterable[float]) -> None:
        """Record many values."""
        for value in values:
            self.add(value)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts into this one.

        Raises:
            ValueError: the histograms were built with different parameters.
        """
        if (other.relative_error, other._floor) != (self.relative_error, self._floor):
            raise ValueError("cannot merge histograms with different parameters")
        for index, n in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + n
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float | None:
        """Return the ``q``-th percentile (0 < q <= 100), or ``None`` if empty.

        The answer is clamped to the exact [min, max], so p100 is the max.
        """
        if not 0 < q <= 100:
            raise ValueError("q must be in (0, 100]")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q / 100 * self.count - 1e-9))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                return min(max(self._value(index), self.min), self.max)
        return self.max  # unreachable: counts sum to count

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form; :meth:`from_dict` restores it."""
        return {
            "relative_error": self.relative_error,
            "floor": self._floor,
            "count": self.count,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "buckets": {str(i): n for i, n in sorted(self._counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Histogram:
        """Rebuild a histogram from :meth:`to_dict` output."""
        relative_error = data["relative_error"]
        floor = data["floor"]
        buckets = data["buckets"]
        if not isinstance(relative_error, float) or not isinstance(floor, float):
            raise ValueError("bad histogram parameters")
        if not isinstance(buckets, Mapping):
            raise ValueError("bad histogram buckets")
        hist = cls(relative_error, floor)
        for key, n in buckets.items():
            hist._counts[int(key)] = int(n)
        hist.count = sum(hist._counts.values())
        low, high = data.get("min"), data.get("max")
        if hist.count:
            if not isinstance(low, int | float) or not isinstance(high, int | float):
                raise ValueError("bad histogram min/max")
            hist.min, hist.max = float(low), float(high)
        return hist
