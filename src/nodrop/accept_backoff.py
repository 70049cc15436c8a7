"""Accept loops at the fd limit: pause instead of spinning.

When ``accept(2)`` fails with ``EMFILE``/``ENFILE`` (or ``ENOBUFS``/``ENOMEM``)
the connection stays in the queue, so the listening socket stays readable: a
loop that logs and returns is called again at once -- 100% CPU and one log
line per turn for as long as the fds are short. Instead, stop watching the
listener for a short pause (doubling from :data:`FIRST_PAUSE` to
:data:`MAX_PAUSE` while it lasts), then try again; the queued clients wait in
the kernel meanwhile. An *episode* is logged twice at most: when it starts,
and when an accept works again (how long it lasted, how many tries failed).

:class:`AcceptBackoff` is the pure part (the caller passes the time); the
holder's ``selectors`` loop uses it directly. :func:`loop_pause` applies it to
an asyncio ``add_reader`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import selectors
import socket
import sys
import weakref
from collections.abc import Callable

FIRST_PAUSE = 0.05
"""Seconds the first failed accept of an episode stops the watch for."""
MAX_PAUSE = 1.0
"""The longest pause: a freed fd is used within a second."""
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""What ``accept(2)`` says when the connection could not be taken but is
still queued (the same set asyncio's own servers pause on)."""


def to_stderr(line: str) -> None:
    """The log of a server process's accept loop: one line on stderr."""
    print(line, file=sys.stderr, flush=True)


def out_of_resources(exc: OSError) -> bool:
    """True if ``exc`` from ``accept(2)`` means "no room for the fd now"."""
    return exc.errno in OUT_OF_RESOURCES


class AcceptBackoff:
    """How long to stop accepting, and one log line per episode.

    Args:
        log: where lines go.
        what: names the listener in them ("nodrop hold: accept").
    """

    def __init__(
        self,
        log: Callable[[str], None],
        what: str,
        *,
        first: float = FIRST_PAUSE,
        longest: float = MAX_PAUSE,
    ) -> None:
        self._log = log
        self._what = what
        self._first = first
        self._longest = longest
        self._since: float | None = None
        self._pause = first
        self.failures = 0
        """Failed accepts in the current episode."""

    @property
    def paused(self) -> bool:
        """True from a failed accept until one works again."""
        return self._since is not None

    def failed(self, exc: OSError, now: float) -> float:
        """An accept failed for want of fds: returns the seconds to pause."""
        self.failures += 1
        if self._since is None:
            self._since = now
            self._pause = self._first
            self._log(
                f"{self._what}: {exc.strerror or exc}; pausing accepts until fds are "
                "free (clients wait in the queue)"
            )
            return self._pause
        self._pause = min(self._longest, self._pause * 2)
        return self._pause

    def accepted(self, now: float) -> None:
        """An accept worked: ends an episode, if one was on."""
        if self._since is None:
            return
        self._log(
            f"{self._what}: accepting again after {now - self._since:.1f}s "
            f"({self.failures} failed attempt(s))"
        )
        self._since = None
        self.failures = 0


class LoopAcceptPause:
    """An :class:`AcceptBackoff` for an asyncio ``add_reader`` accept callback:
    :meth:`failed` removes the reader and adds it back after the pause."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_readable: Callable[[], object],
        log: Callable[[str], None],
        what: str,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        self._loop = loop
        self._sock = weakref.ref(sock)
        self._on_readable = on_readable
        self._wanted = wanted
        self.backoff = AcceptBackoff(log, what)

    def failed(self, exc: OSError) -> None:
        sock = self._sock()
        if sock is None or sock.fileno() < 0:
            return
        pause = self.backoff.failed(exc, self._loop.time())
        self._loop.remove_reader(sock.fileno())
        self._loop.call_later(pause, self._resume)

    def accepted(self) -> None:
        self.backoff.accepted(self._loop.time())

    def _resume(self) -> None:
        sock = self._sock()
        if sock is None or sock.fileno() < 0 or self._loop.is_closed() or not self._wanted():
            return  # closed or stopped meanwhile: its owner stopped watching it for good
        self._loop.add_reader(sock.fileno(), self._on_readable)


class SelectorAcceptPause:
    """An :class:`AcceptBackoff` for a ``selectors`` loop (the holder's):
    :meth:`failed` unregisters the listener, :meth:`resume` registers it
    again (with ``data``) once :attr:`resume_at` has come; the loop includes
    :attr:`resume_at` in its select timeout."""

    def __init__(
        self, selector: selectors.BaseSelector, log: Callable[[str], None], what: str, data: str
    ) -> None:
        self._selector = selector
        self._data = data
        self._sock: socket.socket | None = None
        self.backoff = AcceptBackoff(log, what)
        self.resume_at: float | None = None
        """When the listener is watched again; None while it is watched."""

    def failed(self, sock: socket.socket, exc: OSError, now: float) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._sock = sock
        self.resume_at = now + self.backoff.failed(exc, now)

    def accepted(self, now: float) -> None:
        self.backoff.accepted(now)

    def resume(self, now: float) -> None:
        if self.resume_at is None or now < self.resume_at:
            return
        self.resume_at = None
        sock, self._sock = self._sock, None
        if sock is not None and sock.fileno() >= 0:  # not closed meanwhile
            self._selector.register(sock, selectors.EVENT_READ, self._data)


_PAUSES: weakref.WeakKeyDictionary[socket.socket, LoopAcceptPause] = weakref.WeakKeyDictionary()


def loop_pause(
    sock: socket.socket,
    on_readable: Callable[[], object],
    log: Callable[[str], None],
    what: str,
    wanted: Callable[[], bool] = lambda: True,
) -> LoopAcceptPause:
    """The pause state of the listener ``sock`` watched by ``on_readable`` on
    the running loop (made on first use, forgotten with the socket).
    ``wanted``: checked before watching again (False: the owner stopped
    accepting meanwhile)."""
    pause = _PAUSES.get(sock)
    if pause is None:
        pause = LoopAcceptPause(asyncio.get_running_loop(), sock, on_readable, log, what, wanted)
        _PAUSES[sock] = pause
    return pause


def loop_accepted(sock: socket.socket) -> None:
    """An accept on ``sock`` worked: ends its episode, if one was on."""
    pause = _PAUSES.get(sock)
    if pause is not None and pause.backoff.paused:
        pause.accepted()
