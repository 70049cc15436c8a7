"""When to restart a worker of the active generation that exited, and when
the restarts add up to a crash loop (pure: time is passed in)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from nodrop.supervisor.config import DEFAULT_RESTART_BACKOFF

RESTART_RESET_AFTER = 10.0
"""A worker that stayed up this long starts its backoff again from zero."""
CRASH_LOOP_WINDOW = 60.0
CRASH_LOOP_RESTARTS = 5
"""This many restarts within :data:`CRASH_LOOP_WINDOW` seconds is a crash loop."""


@dataclass
class RestartPolicy:
    """Exponential backoff per worker slot, and the record of recent restarts.

    Attributes:
        backoff: (first delay, longest delay) in seconds.
        reset_after: uptime after which a worker's backoff starts over.
        window, loop_threshold: ``loop_threshold`` restarts within ``window``
            seconds make a crash loop (reported, never hidden).
    """

    backoff: tuple[float, float] = DEFAULT_RESTART_BACKOFF
    reset_after: float = RESTART_RESET_AFTER
    window: float = CRASH_LOOP_WINDOW
    loop_threshold: int = CRASH_LOOP_RESTARTS
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=64))

    def next_attempt(self, restarts: int, uptime: float, now: float) -> tuple[int, float]:
        """A worker that had been restarted ``restarts`` times exited after
        ``uptime`` seconds: its new restart count and the delay before the
        next attempt. Records the restart."""
        self.times.append(now)
        count = 0 if uptime >= self.reset_after else restarts + 1
        return count, self.delay(count)

    def delay(self, restarts: int) -> float:
        """Seconds to wait before attempt number ``restarts`` (0: at once)."""
        low, high = self.backoff
        return 0.0 if restarts <= 0 else min(high, low * 2 ** (restarts - 1))

    def recent(self, now: float) -> int:
        """Restarts within the last :attr:`window` seconds."""
        return sum(1 for t in self.times if now - t < self.window)

    def crash_loop(self, now: float) -> bool:
        return self.recent(now) >= self.loop_threshold
