"""Is the connection handoff doing anything? Workers that did not register.

The supervisor runs the connection broker unless ``--no-handoff`` is given,
but only servers that take part register with it: nodrop's adapters and
servers written on :mod:`nodrop.connhandoff`. Every other server (gunicorn's
sync workers, lighttpd, a plain ``uvicorn``) serves as before, and its idle
keep-alive connections are closed at each reload as without handoff. That
is not an error. A user who asked for handoff (``--handoff``) is warned, in
the log and in ``nodrop status``, rather than finding ``0 handed over``
later; with handoff on by default, the log says it once (:func:`note`).

A worker registers before it says ``READY=1`` (:meth:`AsyncHandoff.start_receiving
<nodrop.connhandoff.aio.AsyncHandoff.start_receiving>` says so), so once a
generation is ready, a ready worker that has not registered will not.

Pure: the supervisor passes the active generation and the broker's list of
registered workers (``stats()["registered_workers"]``).
"""

from __future__ import annotations

from collections.abc import Iterable

from nodrop.supervisor.model import Generation, WorkerState


def unregistered(active: Generation | None, registered: Iterable[int]) -> list[int]:
    """Pids of the active generation's ready workers that no process of
    which registered with the broker."""
    if active is None:
        return []
    known = set(registered)
    return [
        w.pid for w in active.live_workers() if w.state is WorkerState.READY and w.pid not in known
    ]


def warning(active: Generation | None, registered: Iterable[int]) -> str | None:
    """The warning for ``nodrop status`` and the log, or None when every
    ready worker of the active generation registered."""
    missing = unregistered(active, registered)
    if not missing or active is None:
        return None
    total = sum(1 for w in active.live_workers() if w.state is WorkerState.READY)
    pids = ", ".join(str(pid) for pid in missing)
    return (
        f"connection handoff is on, but {len(missing)} of {total} worker(s) of generation "
        f"{active.number} (pid {pids}) did not register with the connection broker: their "
        "server does not support handoff (gunicorn's sync and gthread workers, lighttpd, "
        "a server started without its nodrop adapter). Reloads work as they would without "
        "handoff: their idle keep-alive connections are closed at each reload instead of "
        "handed over, and clients reconnect. To hand them over, run the server through its nodrop adapter "
        "(docs/keepalive.md); to silence this, run with --no-handoff."
    )


def note(active: Generation | None, registered: Iterable[int]) -> str | None:
    """The one log line when handoff is on by default (not asked for) and
    the workers of the active generation did not register, or None."""
    missing = unregistered(active, registered)
    if not missing or active is None:
        return None
    return (
        f"connection handoff: {len(missing)} worker(s) of generation {active.number} did not "
        "register with the connection broker (their server does not take part; "
        "docs/keepalive.md): their idle keep-alive connections are closed at each reload, "
        "as without handoff. --no-handoff turns the broker off."
    )
