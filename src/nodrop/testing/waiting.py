"""The one poll helper, for state that has no event to wait on.

Tests wait on events: a notify ``READY=1``, a pipe byte, EOF, a process
exit. Some state only the kernel or another process can report, and only
when asked (an accept queue's length, a ``/proc`` entry, a field of
``nodrop status``): :func:`wait_for` asks again until the answer is yes or
its deadline passes. It is the only polling loop in the tests and
benchmarks; it runs in child processes too (a private network namespace's
scenario imports it from here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT", "POLL_INTERVAL", "wait_for"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
"""Seconds :func:`wait_for` waits unless told otherwise: a deadline for what
never happens, so generous -- on a busy machine (a parallel test run, other
load) what does happen may take a while."""
POLL_INTERVAL = 0.005
"""Seconds between two checks: short, because every check is cheap."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "",
    *,
    interval: float = POLL_INTERVAL,
) -> T:
    """Call ``predicate`` until it returns a true value; return that value.

    Args:
        predicate: asks the state once; any true value ends the wait.
        timeout: seconds before giving up.
        what: what is awaited, for the error message.
        interval: seconds between two calls.

    Returns:
        The first true value ``predicate`` returned.

    Raises:
        TimeoutError: ``predicate`` did not return a true value in time
            (it is called once more at the deadline).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(min(interval, left))
