"""Logging what a peer may send without limit, at a bounded rate.

A flood of garbage notify datagrams used to write one log line each. A
:class:`RateLimitedLog` writes the first one of each interval as it comes,
counts the rest, and writes one summary line when the interval ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """One line per event at most once per ``interval``, then a summary.

    Args:
        log: where lines go.
        what: the kind of event, for the summary ("notify messages").
        interval: seconds.
    """

    def __init__(
        self, log: Callable[[str], None], what: str, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self._log = log
        self._what = what
        self._interval = interval
        self._suppressed = 0
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0
        """Every event reported, logged or not."""

    def report(self, line: str) -> None:
        """An event: logged now if none was this interval, else counted."""
        self.total += 1
        if self._timer is None:
            self._log(line)
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)
            return
        self._suppressed += 1
        self._last = line

    def _flush(self) -> None:
        self._timer = None
        if self._suppressed:
            self._log(
                f"{self._suppressed} more {self._what} in the last {self._interval:g}s "
                f"(the last: {self._last})"
            )
            self._suppressed = 0
            self._last = ""
            # A flood that goes on keeps to one summary per interval.
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WindowedLog:
    """The same, for a loop that is not asyncio (the holder): the caller
    passes the time, and calls :meth:`tick` to have a due summary written."""

    def __init__(
        self, log: Callable[[str], None], what: str, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self._log = log
        self._what = what
        self._interval = interval
        self._window_end: float | None = None
        self._suppressed = 0
        self._last = ""

    def report(self, line: str, now: float) -> None:
        self.tick(now)
        if self._window_end is None:
            self._log(line)
            self._window_end = now + self._interval
            return
        self._suppressed += 1
        self._last = line

    def tick(self, now: float) -> None:
        """Write the summary of a window that has ended."""
        if self._window_end is None or now < self._window_end:
            return
        if self._suppressed:
            self._log(
                f"{self._suppressed} more {self._what} in the last {self._interval:g}s "
                f"(the last: {self._last})"
            )
        self._window_end = None
        self._suppressed = 0
        self._last = ""
