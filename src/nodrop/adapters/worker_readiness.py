"""Which workers of a pre-fork server have finished starting, across processes.

A generation is ready once *every* worker has finished its application
start-up, not when the first one has: until then a connection may be
accepted by a worker that is still starting (or that will fail to start).
:class:`ReadyBoard` is made in the master before it forks; each worker
marks itself ready in shared memory, and the worker that completes the set
is told so (exactly once), to say ``READY=1``. The master removes workers
that exit (so a worker that died after marking itself is not counted).
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct

DEFAULT_SLOTS = 1024
"""Workers the board can hold at once (more are still counted as not ready)."""

_CELL = struct.Struct("q")


class ReadyBoard:
    """Ready workers' pids in memory shared with forked children (no fd kept open)."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        # Cell 0: 1 once READY=1 was announced; then one pid per cell (0: free).
        self._size = slots + 1
        self._memory = mmap.mmap(-1, _CELL.size * self._size)  # anonymous, MAP_SHARED
        self._lock = multiprocessing.get_context("fork").Lock()

    def _get(self, i: int) -> int:
        value: int = _CELL.unpack_from(self._memory, i * _CELL.size)[0]
        return value

    def _set(self, i: int, value: int) -> None:
        _CELL.pack_into(self._memory, i * _CELL.size, value)

    def _pids(self) -> set[int]:
        return {self._get(i) for i in range(1, self._size)} - {0}

    def mark_ready(self, pid: int, workers: int) -> bool:
        """``pid`` finished starting. True (once) when ``workers`` are ready."""
        with self._lock:
            pids = self._pids()
            if pid not in pids:
                for i in range(1, self._size):
                    if self._get(i) == 0:
                        self._set(i, pid)
                        pids.add(pid)
                        break
            if self._get(0) or len(pids) < workers:
                return False
            self._set(0, 1)
            return True

    def discard(self, pid: int) -> None:
        """``pid`` exited."""
        with self._lock:
            for i in range(1, self._size):
                if self._get(i) == pid:
                    self._set(i, 0)

    def ready_count(self) -> int:
        with self._lock:
            return len(self._pids())
