"""What the control socket can ask of a supervisor: reload, status, stop,
reexec. The socket itself is :mod:`.control`; the state is the supervisor's."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from nodrop.errors import NodropError
from nodrop.supervisor import reexec

if TYPE_CHECKING:
    from nodrop.supervisor.supervisor import Supervisor

CRASH_LOOP_WINDOW = 60.0
CRASH_LOOP_RESTARTS = 5


async def handle(sup: Supervisor, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one control request (already validated by the control socket)."""
    cmd = request["cmd"]
    if cmd == "reload":
        outcome = await sup.reload_and_wait(request.get("wait", "ready"))
        return outcome.to_dict()
    if cmd == "status":
        return {"ok": True, **status(sup)}
    if cmd == "reexec":
        if sup._current is not None or sup._stopping:
            return {
                "ok": False,
                "message": "a reload is in progress or the supervisor is stopping; try again",
            }
        try:
            reexec.snapshot(sup)  # refuse now, with the reason, if it cannot work
        except NodropError as exc:
            return {"ok": False, "message": str(exc)}
        sup.log("re-executing the supervisor's program (nodrop reexec)")
        return {"ok": True, "message": "re-executing", "_after": lambda: _reexec(sup)}
    if cmd == "stop":
        sup.stop()
        assert sup._stopped is not None
        await asyncio.shield(sup._stopped)
        return {"ok": True, "message": "stopped: every generation has exited"}
    return {"ok": False, "message": f"{cmd} is not supported by this supervisor"}


def _reexec(sup: Supervisor) -> None:
    try:
        reexec.execute(sup)
    except NodropError as exc:
        sup.warn(str(exc))


def restarts_last_minute(sup: Supervisor, now: float) -> int:
    return sum(1 for t in sup._restart_times if now - t < CRASH_LOOP_WINDOW)


def status(sup: Supervisor) -> dict[str, Any]:
    """Everything `nodrop status` shows."""
    now = time.monotonic()
    restarts = restarts_last_minute(sup, now)
    return {
        "pid": os.getpid(),
        "uptime": round(now - sup.started, 3),
        "reexecs": sup.reexecs,
        "strategy": sup.config.strategy.value,
        "control": sup.control_path,
        "active_generation": None if sup.active is None else sup.active.number,
        "reload_in_progress": sup._current is not None,
        "stopping": sup._stopping,
        "generations": [g.to_dict(now) for g in sup.generations],
        "listeners": sup.listeners.status(),
        "reloads": [o.to_dict() for o in sup.history],
        "restarts_last_minute": restarts,
        "crash_loop": restarts >= CRASH_LOOP_RESTARTS,
        "warnings": list(sup.listeners.warnings()) + list(sup.warnings_log),
        "summary": sup._status_line(),
        "handoff": None if sup.broker is None else getattr(sup.broker, "stats", dict)(),
    }
