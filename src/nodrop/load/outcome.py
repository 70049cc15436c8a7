"""What happened to one request attempt, as an enum, and the pure classifier.

The classifier takes facts the worker observed (which phase failed, the
exception, the HTTP status, whether a whole response arrived) and returns
one :class:`Outcome`. It does no I/O, so every branch is unit-tested with
hand-made facts as well as provoked for real against small servers.
"""

from __future__ import annotations

import enum
import errno

#: HTTP statuses from this one up count as a failure (``bad_status``).
DEFAULT_BAD_STATUS_FROM = 500


class Outcome(enum.IntEnum):
    """The class of one attempt. Values are stable: they travel between processes."""

    OK = 0
    REFUSED = 1
    """``ECONNREFUSED``: nothing listening (the classic dropped-listener symptom)."""
    RESET = 2
    """``ECONNRESET``: the peer aborted the connection (RST)."""
    EOF = 3
    """The connection closed cleanly before a complete response."""
    BROKEN_PIPE = 4
    """``EPIPE`` while sending: the peer had already gone."""
    TIMEOUT = 5
    """Connect or response took longer than the attempt's deadline."""
    BAD_STATUS = 6
    """HTTP status >= 500, or a response that is not valid HTTP/1.x."""
    OTHER = 7
    """Any other error (unexpected errno, exception)."""

    @property
    def label(self) -> str:
        """The lower-case name used in tables, JSON and the HTML report."""
        return self.name.lower()


_ERRNO_OUTCOME: dict[int, Outcome] = {
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.ECONNRESET: Outcome.RESET,
    errno.ECONNABORTED: Outcome.RESET,
    errno.EPIPE: Outcome.BROKEN_PIPE,
    errno.ETIMEDOUT: Outcome.TIMEOUT,
}


def classify(
    *,
    error: BaseException | None = None,
    status: int | None = None,
    complete: bool = False,
    malformed: bool = False,
    bad_status_from: int = DEFAULT_BAD_STATUS_FROM,
) -> Outcome:
    """Classify one attempt from what was observed.

    Args:
        error: the exception that ended the attempt, if any. ``TimeoutError``
            (``asyncio.timeout`` raises it) means the deadline passed; an
            ``OSError`` is classified by its errno.
        status: the HTTP status code received, if a status line was parsed.
            ``None`` for raw TCP mode.
        complete: whether a complete response (HTTP) or line (TCP) arrived.
        malformed: whether the bytes received were not a valid response.
        bad_status_from: statuses at or above this are failures.

    Returns:
        The outcome. An error wins over anything received before it, except
        that a complete response followed by an error (e.g. a reset after
        the body) still counts as OK: the client got its answer.
    """
    if malformed:
        return Outcome.BAD_STATUS
    if complete:
        if status is not None and status >= bad_status_from:
            return Outcome.BAD_STATUS
        return Outcome.OK
    if error is None:
        # No error, but no complete response either: the peer closed first.
        return Outcome.EOF
    if isinstance(error, TimeoutError):  # asyncio's deadline, or ETIMEDOUT
        return Outcome.TIMEOUT
    if isinstance(error, OSError) and error.errno is not None:
        return _ERRNO_OUTCOME.get(error.errno, Outcome.OTHER)
    if isinstance(error, EOFError):
        return Outcome.EOF
    return Outcome.OTHER
