"""Reload a service under ``nodrop run`` through its control socket.

Unlike a shell command, the supervisor knows when the new generation was
ready and when the old one had exited, so the reload window is exact.
"""

from __future__ import annotations

import time

from nodrop.errors import ControlError
from nodrop.load.reload import ReloadRecord
from nodrop.supervisor.control import request

DEFAULT_RELOAD_TIMEOUT = 120.0


class ControlReloader:
    """A :class:`~nodrop.load.reload.Reloader` for ``nodrop run``."""

    def __init__(self, control_path: str, *, timeout: float = DEFAULT_RELOAD_TIMEOUT) -> None:
        self.control_path = control_path
        self.timeout = timeout

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        try:
            answer = request(self.control_path, "reload", wait="drained", timeout=self.timeout)
        except ControlError as exc:
            return ReloadRecord(started, None, None, False, str(exc), time.monotonic())
        finished = time.monotonic()
        return ReloadRecord(
            started=started,
            ready=answer.get("ready"),
            old_exited=answer.get("old_exited"),
            ok=bool(answer.get("ok")),
            message=str(answer.get("message", "")),
            finished=finished,
        )
