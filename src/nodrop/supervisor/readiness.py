"""When is a new generation ready -- or why is it not (pure but for waiting).

Every worker must have said ``READY=1`` (or its ``--ready delay`` passed) and
all must then stay up for the ready grace; a worker that exits, or a deadline
that passes, fails the generation with a message fit for `nodrop reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

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
            # On lines of their own: the caller adds its verdict to the first line.
            last = f"\n  last lines of its stderr:{tail}" if tail else ""
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
    gen: Generation, timeout: float, grace: float, clock: Callable[[], float] = time.monotonic
) -> str | None:
    """None when every worker is ready and stayed up ``grace`` seconds, else
    why not. Wakes on ``gen.changed``, which the supervisor sets on every
    change to ``gen``; ``clock`` is the supervisor's."""
    deadline = clock() + timeout
    stable_at: float | None = None
    while True:
        if gen.note:
            return f"generation {gen.number}: {gen.note}"
        failure = exit_failure(gen, clock())
        if failure is not None:
            return failure
        if gen.all_ready():
            if stable_at is None:
                stable_at = clock() + grace
            remaining = stable_at - clock()
            if remaining <= 0:
                return None
        else:
            remaining = deadline - clock()
            if remaining <= 0:
                return not_ready_message(gen, timeout)
        gen.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gen.changed.wait(), remaining)
