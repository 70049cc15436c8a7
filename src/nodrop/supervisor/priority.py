"""``--startup-priority``: new workers start at a lower CPU priority and get
the normal one back when they say ``READY=1``.

A reload starts a whole generation while the old one serves. On a machine
with few cores the new workers' start-up (imports, the app's own set-up)
takes CPU from the workers that are answering requests: the latency bump of
a reload (``benchmarks/reload_latency.py`` measures it, phase by phase).

* ``normal``: nothing changes (the default);
* ``low``: ``nice`` +10 (CPU weight about a tenth of a normal process's);
* ``idle``: ``SCHED_IDLE`` -- the new workers run only on CPU time nobody
  else wants (Linux; weight 3 against 1024).

The trade-off is the reload's length: on a saturated machine a low-priority
start-up takes longer, and ``--ready-timeout`` still applies. Getting the
normal priority back needs ``CAP_SYS_NICE`` or a ``RLIMIT_NICE`` that
allows it; where the supervisor has neither, the worker stays lowered and the
supervisor warns once (``nodrop status`` shows it).
"""

from __future__ import annotations

import enum
import os

LOW_NICE = 10
"""How much ``low`` adds to the supervisor's own nice value."""


class StartupPriority(enum.Enum):
    NORMAL = "normal"
    LOW = "low"
    IDLE = "idle"


def parse_startup_priority(text: str) -> StartupPriority:
    """``normal``, ``low`` or ``idle`` (pure).

    Raises:
        ValueError: anything else.
    """
    try:
        return StartupPriority(text.strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in StartupPriority)
        raise ValueError(f"startup priority {text!r}: expected one of {choices}") from None


def lower(pid: int, priority: StartupPriority) -> str | None:
    """Lower a just-spawned worker's priority; why not, or None."""
    try:
        if priority is StartupPriority.LOW:
            own = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, pid, min(19, own + LOW_NICE))
        elif priority is StartupPriority.IDLE:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        return f"cannot lower the start-up priority of pid {pid}: {exc}"
    return None


def threads_of(pid: int, proc: str = "/proc") -> list[int]:
    """The thread ids of ``pid`` (just ``pid`` if they cannot be listed)."""
    try:
        return [int(tid) for tid in os.listdir(f"{proc}/{pid}/task")]
    except (OSError, ValueError):
        return [pid]


def restore(pid: int, priority: StartupPriority) -> str | None:
    """Give a worker that said READY=1 the supervisor's own priority back;
    why not, or None (a worker already gone is not an error).

    Priority and policy belong to each thread on Linux, and threads started
    during start-up inherited the lowered one: every thread is restored.
    """
    if priority is StartupPriority.NORMAL:
        return None
    try:
        for tid in threads_of(pid):
            try:
                if priority is StartupPriority.LOW:
                    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, 0))
                else:
                    os.sched_setscheduler(tid, os.sched_getscheduler(0), os.sched_getparam(0))
            except ProcessLookupError:
                continue  # that thread (or the whole worker) is gone
    except ProcessLookupError:
        return None
    except OSError as exc:
        return (
            f"cannot restore the priority of pid {pid} after READY=1: {exc} "
            "(needs CAP_SYS_NICE or RLIMIT_NICE); it keeps running at "
            f"--startup-priority {priority.value}"
        )
    return None
