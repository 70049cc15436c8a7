"""When is a new generation ready -- or why is it not (pure but for waiting).

Every worker must have said ``READY=1`` (or its ``--ready delay`` passed) and
all must then stay up for the ready grace; a worker that exits, or a deadline
that passes, fails the generation with a message fit for `nodrop reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nodrop.supervisor.config import ReadyMode
from nodrop.supervisor.model import Generation, WorkerState

NOT_READY_HINT = (
    " (does the server send READY=1 to $NOTIFY_SOCKET? if it cannot, use --ready delay:SECONDS)"
)


def exit_failure(gen: Generation, now: float) -> str | None:
    """Why the generation failed because a worker exited, or None."""
    for worker in gen.workers:
        if worker.state is WorkerState.EXITED:
            tail = "".join(f"\n    {line}" for line in worker.stderr_tail)
            last = f"; last lines of its stderr:{tail}" if tail else ""
            when = (
                "before it was ready"
                if worker.ready_at is None
                else f"{now - worker.ready_at:.2f}s after it was ready"
            )
            return (
                f"generation {gen.number}, worker {worker.index} {worker.describe_exit()} "
                f"{when}{last}"
            )
    return None


def not_ready_message(gen: Generation, timeout: float) -> str:
    waiting = [str(w.index) for w in gen.workers if w.state is WorkerState.STARTING]
    hint = NOT_READY_HINT if gen.config.ready.mode is ReadyMode.NOTIFY else ""
    return (
        f"generation {gen.number} was not ready within {timeout:g}s: "
        f"worker(s) {', '.join(waiting)} still starting{hint}"
    )


async def wait_ready(
    gen: Generation, changed: asyncio.Event, timeout: float, grace: float
) -> str | None:
    """None when every worker is ready and stayed up ``grace`` seconds, else
    why not. ``changed`` is set by the supervisor on every change to ``gen``."""
    deadline = time.monotonic() + timeout
    stable_at: float | None = None
    while True:
        if gen.note:
            return f"generation {gen.number}: {gen.note}"
        failure = exit_failure(gen, time.monotonic())
        if failure is not None:
            return failure
        if gen.all_ready():
            if stable_at is None:
                stable_at = time.monotonic() + grace
            remaining = stable_at - time.monotonic()
            if remaining <= 0:
                return None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return not_ready_message(gen, timeout)
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)
