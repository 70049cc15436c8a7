"""Workers' stdout and stderr, passed through with a tag per worker.

Each line becomes ``[g3.w1] original line`` on the supervisor's own stdout or
stderr, so logs of overlapping generations stay readable. The last lines of
each worker's stderr are kept for the message of a failed reload.

An output that fails (a full disk, a closed pipe) costs only the lines it
could not take (:mod:`.logsink`): the pipes are still read to the end, so
no worker blocks on a full pipe, and the stderr tail is still kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
from collections.abc import Callable
from typing import BinaryIO

from nodrop.supervisor.logsink import sink_for

MAX_LINE = 64 * 1024
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
DRAIN_AT_CLOSE = 4 * 1024 * 1024
"""At most this many bytes still in a pipe are read when it closes (a
grandchild that keeps the write end open must not hold the loop)."""


class TaggedStream:
    """Reads one pipe, writes tagged lines to ``sink``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        tag: str,
        sink: BinaryIO,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._tag = tag.encode() + b" "
        self._sink = sink_for(sink)
        self._on_line = on_line
        self._partial = b""
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        data = self._read_chunk()
        if data is None:
            return
        if not data:
            self.close()
            return
        self._take(data)

    def _read_chunk(self) -> bytes | None:
        """What the pipe has: bytes, b"" at EOF (or error), None if nothing now."""
        try:
            return os.read(self._fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _take(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        self._emit(lines)

    def _emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        self._sink.write(b"".join(self._tag + line + b"\n" for line in lines), len(lines))
        if self._on_line is not None:
            for line in lines:
                self._on_line(line.decode("utf-8", "replace"))

    def close(self) -> None:
        """Pass on what is still in the pipe (to EOF, or to what is there
        now if another process keeps the write end open), then close it: a
        worker's last lines -- often why it failed -- are never lost."""
        if self._fd < 0:
            return
        budget = DRAIN_AT_CLOSE
        while budget > 0:
            data = self._read_chunk()
            if not data:
                break
            budget -= len(data)
            self._take(data)
        if self._partial:
            self._emit([self._partial])
            self._partial = b""
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    def fileno(self) -> int:
        return self._fd


class WorkerOutput:
    """The tagged stdout/stderr streams of every worker, by pid."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._streams: dict[int, list[TaggedStream]] = {}

    def pipes(self) -> list[tuple[int, int]]:
        """(read, write) pairs for a new worker's stdout and stderr, or none."""
        if not self.enabled:
            return []
        first = os.pipe2(os.O_CLOEXEC)
        try:
            pairs = [first, os.pipe2(os.O_CLOEXEC)]
        except OSError:  # EMFILE: leave no half of the pair open
            os.close(first[0])
            os.close(first[1])
            raise
        for r, _ in pairs:
            # Room for what a worker writes while no supervisor reads (ours
            # died, the next is on its way); the default is 64 KiB.
            with contextlib.suppress(OSError):
                fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_SIZE)
        return pairs

    def attach(
        self, pid: int, label: str, read_fds: list[int], on_stderr: Callable[[str], None]
    ) -> None:
        """Start passing a worker's output through, tagged ``[label]``."""
        if len(read_fds) != 2:
            return
        tag = f"[{label}]"
        loop = asyncio.get_running_loop()
        self._streams[pid] = [
            TaggedStream(loop, read_fds[0], tag, sys.stdout.buffer),
            TaggedStream(loop, read_fds[1], tag, sys.stderr.buffer, on_stderr),
        ]

    def fds(self, pid: int) -> list[int]:
        """The read ends of a worker's pipes (to keep them across re-exec)."""
        return [s.fileno() for s in self._streams.get(pid, []) if s.fileno() >= 0]

    def detach(self, pid: int) -> None:
        for stream in self._streams.pop(pid, []):
            stream.close()

    def close(self) -> None:
        for pid in list(self._streams):
            self.detach(pid)
