"""Where the supervisor's lines go: an output that may fail, and must not
take anything down with it.

The stdout and stderr of ``nodrop run`` are often a file on a disk that can
fill (``ENOSPC``), a pipe whose reader died (``EPIPE``) or a terminal that
went away (``EIO``). None of that may fail a reload, kill the supervisor or
stop it reading its workers' pipes (a worker blocked on a full pipe stops
serving). So a line that cannot be written is dropped and counted, and the
first line written after a loss is preceded by one that says how many were
lost and why: a log that resumes shows its gap.

Lines go straight to the file descriptor with ``os.write`` -- no buffer in
user space that would keep a failed line and write it later, out of order,
or fail again at interpreter exit.

A reader that stops reading (a stalled log collector, a paused terminal)
would make a plain write block once the pipe or socket is full, and with it
the supervisor's whole loop: no reload, no worker output read, workers
blocked on their own pipes. So each piece (at most ``PIPE_BUF`` bytes, which
a writable pipe takes whole) is written only once ``poll`` says the output
takes it; otherwise it is dropped like a failed write. The descriptor's own
flags are left alone: it is often shared with the process that started us.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
from typing import IO, Any


def gap_line(lost: int, error: str, pid: int) -> bytes:
    """The line that marks lost output (pure)."""
    return f"nodrop[{pid}]: warning: {lost} log line(s) lost: {error}\n".encode()


class LogSink:
    """One output (a stream or its file descriptor), written line by line,
    never raising.

    Attributes:
        lost: lines dropped since the output last worked.
        lost_total: lines dropped over the sink's life.
        error: why the last write failed (``strerror``).
    """

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream
        self._fd = _real_fd(stream)
        self._torn = False
        self.lost = 0
        self.lost_total = 0
        self.error = ""

    def write(self, data: bytes, lines: int = 1) -> bool:
        """Write ``data`` (``lines`` whole lines); False if it was dropped."""
        if self.lost:
            note = gap_line(self.lost, self.error, os.getpid())
            if not self._put(b"\n" + note if self._torn else note):
                return self._dropped(lines)
            self.lost = 0
            self._torn = False
        if not self._put(data):
            return self._dropped(lines)
        return True

    def _dropped(self, lines: int) -> bool:
        self.lost += lines
        self.lost_total += lines
        return False

    def _put(self, data: bytes) -> bool:
        if self._fd is None:
            try:
                if isinstance(self._stream, io.TextIOBase):
                    self._stream.write(data.decode("utf-8", "replace"))
                else:
                    self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self.error = str(exc)
                return False
            return True
        view = memoryview(data)
        try:
            while view:
                if not _takes_more(self._fd):
                    self.error = STALLED
                    self._torn = self._torn or len(view) < len(data)
                    return False
                written = os.write(self._fd, view[: select.PIPE_BUF])
                if written < min(len(view), select.PIPE_BUF):
                    self._torn = True
                view = view[written:]
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            self._torn = self._torn or len(view) < len(data)
            return False
        return True


STALLED = "the output is full: its reader is not reading"


def _takes_more(fd: int) -> bool:
    """Whether a write of up to ``PIPE_BUF`` bytes to ``fd`` returns at once
    (a file always; a pipe, socket or terminal with room). An error or hang-up
    counts as yes: the write then fails with its own reason."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(0)
    return bool(
        events
        and events[0][1] & (select.POLLOUT | select.POLLERR | select.POLLHUP | select.POLLNVAL)
    )


def _real_fd(stream: IO[Any]) -> int | None:
    """The stream's fd, once its own buffer is flushed; None for an in-memory
    stream (tests) or one whose fd is gone."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
    return fd


_shared: dict[int, LogSink] = {}


def sink_for(stream: IO[Any]) -> LogSink:
    """The sink of ``stream``: the process's stdout and stderr (fds 1 and 2)
    have one each, so that the supervisor's lines and its workers' share one
    count of what was lost; any other stream gets a sink of its own."""
    fd = _real_fd(stream)
    if fd not in (1, 2):
        return LogSink(stream)
    if fd not in _shared:
        _shared[fd] = LogSink(stream)
    return _shared[fd]


def lost_lines() -> int:
    """Lines dropped so far over every shared sink (for ``nodrop status``)."""
    return sum(sink.lost_total for sink in _shared.values())


def warnings() -> list[str]:
    """One line per output that is losing lines now (for ``nodrop status``)."""
    names = {1: "stdout", 2: "stderr"}
    return [
        f"{names.get(fd, f'fd {fd}')}: {sink.lost} log line(s) lost so far: {sink.error}"
        for fd, sink in sorted(_shared.items())
        if sink.lost
    ]


def say(message: str) -> None:
    """One line on stderr that may be lost but never raises."""
    sink_for(sys.stderr).write(f"{message}\n".encode(errors="replace"))
