"""A fake of the supervisor's OS seam, :class:`nodrop.supervisor.process.Processes`.

:class:`FakeProcesses` starts nothing. ``spawn`` returns a fake pid and
records what a real worker would have got (argv, environment, fds); the
test decides when each worker exits and with what code
(:meth:`FakeProcesses.exit`), and the supervisor learns of it the way it
learns of a real exit: the ``watch`` callback runs on its loop (as SIGCHLD
would) and :meth:`~FakeProcesses.reap` returns the exit status. Signals are
recorded per process; SIGKILL always ends a process (it cannot be caught),
any other signal does what the process's ``on_signal`` says (nothing, by
default: a worker that ignores its drain signal).

With :class:`~nodrop.testing.clock.VirtualTimeLoop`, crash loops, restart
backoff, drain timeouts and ready timeouts run in milliseconds::

    fake = FakeProcesses(on_signal=exit_on(signal.SIGTERM))
    sup = Supervisor(config, listeners, control_path=..., processes=fake,
                     clock=asyncio.get_running_loop().time)
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["FIRST_PID", "FakeProcess", "FakeProcesses", "OnSignal", "exit_on"]

FIRST_PID = 2**22 + 1
"""Fake pids count up from here: above ``PID_MAX_LIMIT`` (2**22, the largest
``pid_max`` Linux allows), so a fake pid is never a real process's."""

OnSignal = Callable[["FakeProcess", int], int | None]
"""What a fake process does with a signal: the exit code to exit with, or
None to go on running."""


def exit_on(*signals: int, code: int = 0) -> OnSignal:
    """A process that exits with ``code`` on any of ``signals`` (a worker that
    drains at once), and ignores every other signal."""
    wanted = frozenset(signals)

    def on_signal(_process: FakeProcess, sig: int) -> int | None:
        return code if sig in wanted else None

    return on_signal


def _ignore(_process: FakeProcess, _sig: int) -> int | None:
    return None


@dataclass(eq=False)
class FakeProcess:
    """One fake child: what it was started with, and what happened to it.

    Attributes:
        pid: its fake pid (also its process group: nodrop's workers lead one).
        argv, env: the command and environment it was given.
        fds: the fds it was given (their numbers in the supervisor; the
            fake neither keeps nor closes them).
        names: their ``LISTEN_FDNAMES``.
        signals: every signal sent to it while it was running, in order.
        exit_code: None while running; then its status as the supervisor
            sees it (negative: killed by that signal).
        reaped: the supervisor collected its status.
        on_signal: what it does with a signal other than SIGKILL.
    """

    pid: int
    argv: tuple[str, ...]
    env: dict[str, str]
    fds: tuple[int, ...]
    names: tuple[str, ...]
    on_signal: OnSignal = _ignore
    signals: list[int] = field(default_factory=list)
    exit_code: int | None = None
    reaped: bool = False

    @property
    def running(self) -> bool:
        return self.exit_code is None


class FakeProcesses:
    """Implements the ``Processes`` protocol without a single process.

    Args:
        on_signal: what every new process does with a signal other than
            SIGKILL (each process's own ``on_signal`` may be changed later).
        first_pid: the first fake pid.

    Attributes:
        processes: every process spawned, by pid, in spawn order.
        spawn_errors: errors the next calls to :meth:`spawn` raise, one each
            (a command that cannot be started).
    """

    def __init__(self, *, on_signal: OnSignal = _ignore, first_pid: int = FIRST_PID) -> None:
        self.on_signal = on_signal
        self.processes: dict[int, FakeProcess] = {}
        self.spawn_errors: list[OSError] = []
        self.parents: dict[int, int] = {}
        """Parent pids of processes the test pretends exist (a worker's children)."""
        self._next_pid = first_pid
        self._exited: list[tuple[int, int]] = []
        self._watcher: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None
        self._waiters: list[asyncio.Future[None]] = []

    # -- the Processes protocol ------------------------------------------------
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
        """Start a fake process; its pid. Raises the next of :attr:`spawn_errors`."""
        del stdout, stderr, cwd, keep  # the fake writes no output and has no directory
        if self.spawn_errors:
            raise self.spawn_errors.pop(0)
        pid = self._next_pid
        self._next_pid += 1
        self.processes[pid] = FakeProcess(
            pid, tuple(argv), dict(env), tuple(fds), tuple(names), self.on_signal
        )
        self._changed()
        return pid

    def signal(self, pid: int, sig: int) -> None:
        """Deliver ``sig`` to ``pid`` if it runs (else nothing, as ``kill`` on
        a pid that is gone or a zombie does)."""
        process = self.processes.get(pid)
        if process is None or not process.running:
            return
        process.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(pid, -signal.SIGKILL)
            return
        code = process.on_signal(process, sig)
        if code is not None:
            self.exit(pid, code)
        else:
            self._changed()

    def signal_group(self, pgid: int, sig: int) -> None:
        for process in list(self.processes.values()):
            if process.pid == pgid:
                self.signal(process.pid, sig)

    def reap(self) -> list[tuple[int, int]]:
        """Every exit not collected yet, as ``(pid, exit code)``."""
        out, self._exited = self._exited, []
        for pid, _ in out:
            self.processes[pid].reaped = True
        return out

    def group_of(self, pid: int) -> int | None:
        process = self.processes.get(pid)
        return None if process is None or process.reaped else process.pid

    def parent_of(self, pid: int) -> int | None:
        """What :attr:`parents` says (a test sets ``parents[child] = worker``)."""
        return self.parents.get(pid)

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        self._watcher = (loop, on_exit)

    def unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watcher is not None and self._watcher[0] is loop:
            self._watcher = None

    # -- the test's side -----------------------------------------------------------
    def exit(self, pid: int, code: int = 0) -> None:
        """``pid`` exits with ``code`` (negative: killed by that signal); the
        watcher is told on its loop, as SIGCHLD would tell it.

        Raises:
            ValueError: ``pid`` was never spawned or has exited already.
        """
        process = self.processes.get(pid)
        if process is None or not process.running:
            raise ValueError(f"pid {pid} is not a running fake process")
        process.exit_code = code
        self._exited.append((pid, code))
        if self._watcher is not None:
            loop, on_exit = self._watcher
            loop.call_soon(on_exit)
        self._changed()

    def running(self) -> list[FakeProcess]:
        """The processes that have not exited, in spawn order."""
        return [p for p in self.processes.values() if p.running]

    def spawned(self) -> list[FakeProcess]:
        """Every process spawned so far, in spawn order."""
        return list(self.processes.values())

    async def wait_until(
        self, predicate: Callable[[], object], timeout: float, what: str = ""
    ) -> None:
        """Wait until ``predicate()`` is true, checking after every spawn,
        signal and exit (events, not polling).

        Raises:
            TimeoutError: not true within ``timeout`` seconds of the loop's
                time (virtual time on a :class:`~nodrop.testing.clock.VirtualTimeLoop`).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                continue  # checked once more, then the deadline raises
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def wait_spawned(self, count: int, timeout: float) -> FakeProcess:
        """Wait until ``count`` processes were spawned in all; the last of them."""
        await self.wait_until(
            lambda: len(self.processes) >= count, timeout, f"{count} processes spawned"
        )
        return self.spawned()[count - 1]

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
