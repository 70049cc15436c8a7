"""What the control socket can ask of a supervisor -- reload, status, stop,
reexec -- and the shape of each answer.

The socket itself is :mod:`.control`; the state is the supervisor's, reached
only through :class:`ControlTarget`, the handful of public methods a
supervisor offers to its control socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

from nodrop.supervisor.model import ReloadOutcome

Wait = Literal["ready", "drained"]


class ControlRequest(TypedDict, total=False):
    """One request, as :func:`nodrop.supervisor.control.parse_request` checked it."""

    cmd: Literal["reload", "status", "stop", "reexec"]
    wait: Wait


class StatusReply(TypedDict):
    """What ``nodrop status --json`` prints (``ok`` is added by the socket)."""

    pid: int
    name: str
    version: str
    uptime: float
    reexecs: int
    strategy: str
    control: str
    active_generation: int | None
    reload_in_progress: bool
    stopping: bool
    generations: list[dict[str, Any]]
    listeners: list[dict[str, Any]]
    reloads: list[dict[str, Any]]
    restarts_last_minute: int
    restarts_total: int
    restart_failures: int
    degraded: bool
    recovery: dict[str, Any] | None
    crash_loop: bool
    warnings: list[str]
    log_lines_lost: int
    summary: str
    handoff: dict[str, Any] | None
    metrics: dict[str, Any]
    metrics_address: str | None


@dataclass(frozen=True)
class Reply:
    """An answer to send, and what to do once it is on its way (``nodrop
    reexec`` answers first, then replaces the program)."""

    body: dict[str, Any]
    after: Callable[[], None] | None = None


class ControlTarget(Protocol):
    """What the control socket may do to a supervisor."""

    async def reload_and_wait(self, wait: Wait = "ready") -> ReloadOutcome: ...

    def status(self) -> StatusReply: ...

    async def stop_and_wait(self) -> None: ...

    def reexec_refusal(self) -> str | None:
        """Why ``nodrop reexec`` cannot happen now, or None if it can."""

    def reexec(self) -> None:
        """Replace the program now (returns only if that failed)."""


def message(ok: bool, text: str) -> dict[str, Any]:
    return {"ok": ok, "message": text}


async def handle(target: ControlTarget, request: ControlRequest) -> Reply:
    """Answer one control request (already validated by the control socket)."""
    cmd = request["cmd"]
    if cmd == "reload":
        outcome = await target.reload_and_wait(request.get("wait", "ready"))
        return Reply(outcome.to_dict())
    if cmd == "status":
        return Reply({"ok": True, **target.status()})
    if cmd == "reexec":
        why = target.reexec_refusal()
        if why is not None:
            return Reply(message(False, why))
        return Reply(message(True, "re-executing"), after=target.reexec)
    if cmd == "stop":
        await target.stop_and_wait()
        return Reply(message(True, "stopped: every generation has exited"))
    return Reply(message(False, f"{cmd} is not supported by this supervisor"))
