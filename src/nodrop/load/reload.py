"""Reloads triggered during a load run: the protocol and a shell-command reloader.

The runner calls :meth:`Reloader.reload` from the parent process and blocks
on it; the returned :class:`ReloadRecord` carries ``time.monotonic()`` stamps
(CLOCK_MONOTONIC is system-wide on Linux, so they compare with the workers'
samples). A record defines one *reload window*: from ``started`` until the
old generation exited -- or, when that is unknown, until ``finished``.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import time
from typing import Protocol

#: Extra seconds a CommandReloader counts into the window after its command returns.
DEFAULT_SETTLE = 0.0
#: Deadline for a reload command (seconds).
DEFAULT_COMMAND_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class ReloadRecord:
    """What one reload did, in monotonic seconds.

    Attributes:
        started: just before the reload was requested.
        ready: when the new generation said it was ready, if known.
        old_exited: when the old generation had exited, if known.
        ok: whether the reload succeeded.
        message: a human note (error text, pids...).
        finished: when ``reload()`` returned (plus any settle time); the end
            of the window when ``old_exited`` is unknown.
    """

    started: float
    ready: float | None
    old_exited: float | None
    ok: bool
    message: str
    finished: float | None = None

    @property
    def window(self) -> tuple[float, float]:
        """The reload window ``(start, end)``; see the module docstring."""
        for end in (self.old_exited, self.finished, self.ready):
            if end is not None:
                return (self.started, max(end, self.started))
        return (self.started, self.started)

    @property
    def duration(self) -> float:
        """Length of the window in seconds."""
        start, end = self.window
        return end - start

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form."""
        return dataclasses.asdict(self)


class Reloader(Protocol):
    """Anything that can reload the server under test, synchronously."""

    def reload(self) -> ReloadRecord:
        """Reload once and return what happened; must not raise for a failed reload."""
        ...


class CommandReloader:
    """Reload by running a shell command (``kill -HUP 1234``, ``nginx -s reload``).

    Honesty limit: a command that returns tells nothing about when the old
    generation exits (``kill -HUP`` returns at once; ``nginx -s reload``
    returns before old workers drain). So ``ready`` and ``old_exited`` are
    ``None`` and the window is start .. command return + ``settle``; choose
    ``settle`` to cover the server's drain time, or use a reloader that asks
    the supervisor.

    Args:
        command: the shell command, run with ``/bin/sh -c``.
        settle: seconds added to the window after the command returns (the
            reloader sleeps that long, so the next reload starts after it).
        timeout: deadline for the command.
    """

    def __init__(
        self,
        command: str,
        *,
        settle: float = DEFAULT_SETTLE,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.command = command
        self.settle = settle
        self.timeout = timeout

    def reload(self) -> ReloadRecord:
        """Run the command once; see the class docstring for the window."""
        started = time.monotonic()
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", self.command],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ReloadRecord(
                started, None, None, False, f"timed out after {self.timeout}s", time.monotonic()
            )
        except OSError as exc:
            return ReloadRecord(started, None, None, False, str(exc), time.monotonic())
        if self.settle > 0:
            time.sleep(self.settle)  # the settle time is part of the window by definition
        finished = time.monotonic()
        output = (proc.stderr or proc.stdout).strip()
        message = f"{shlex.quote(self.command)} exited {proc.returncode}"
        if output:
            message += f": {output[:200]}"
        return ReloadRecord(started, None, None, proc.returncode == 0, message, finished)
