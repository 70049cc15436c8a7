"""The OS seam: spawning workers, signalling them, reaping them.

Everything the supervisor does to processes goes through :class:`Processes`,
so tests substitute a fake whose exits and signals they control
(:class:`nodrop.testing.fakes.FakeProcesses`); the real one is
:class:`OsProcesses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from nodrop.supervisor.lineage import proc_parent
from nodrop.systemd.spawn import spawn

PR_SET_CHILD_SUBREAPER = 36


class Processes(Protocol):
    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        fds: Sequence[int],
        names: Sequence[str],
        stdout: int | None,
        stderr: int | None,
        cwd: str | None = None,
        keep: Sequence[int] = (),
    ) -> int: ...

    def signal(self, pid: int, sig: int) -> None: ...

    def signal_group(self, pgid: int, sig: int) -> None: ...

    def reap(self) -> list[tuple[int, int]]: ...

    def group_of(self, pid: int) -> int | None: ...

    def parent_of(self, pid: int) -> int | None: ...

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` on ``loop`` whenever a child may have exited
        (then :meth:`reap` tells which)."""

    def unwatch(self, loop: asyncio.AbstractEventLoop) -> None: ...


class OsProcesses:
    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        fds: Sequence[int],
        names: Sequence[str],
        stdout: int | None,
        stderr: int | None,
        cwd: str | None = None,
        keep: Sequence[int] = (),
    ) -> int:
        return spawn(
            argv, env=env, fds=fds, names=names, stdout=stdout, stderr=stderr, cwd=cwd, keep=keep
        )

    def signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def signal_group(self, pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def reap(self) -> list[tuple[int, int]]:
        """Collect every exited child, ours or orphans handed to us."""
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.append((pid, os.waitstatus_to_exitcode(status)))
        return out

    def group_of(self, pid: int) -> int | None:
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    def parent_of(self, pid: int) -> int | None:
        return proc_parent(pid)

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        loop.add_signal_handler(signal.SIGCHLD, on_exit)

    def unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGCHLD)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (as PID 1 does), so that a worker that
    double-forks is still reaped by us. Returns False where not supported."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
