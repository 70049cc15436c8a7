"""sd_notify, the sending side: tell the manager we are ready, reloading, ...

Follows systemd's ``sd_pid_notify_with_fds``: ``NOTIFY_SOCKET`` is a
filesystem path or, with a leading ``@``, a name in the abstract namespace
(its address length excludes any trailing NUL); the datagram is sent with
``MSG_NOSIGNAL``; without ``NOTIFY_SOCKET`` every call is a no-op returning
False. Works the same under systemd and under ``nodrop run``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

from nodrop.errors import NotifyError
from nodrop.kernel.fdpass import send_with_fds
from nodrop.systemd.message import format_message


def notify_address(value: str) -> str:
    """The ``connect()`` address for a ``NOTIFY_SOCKET`` value (pure).

    Raises:
        NotifyError: not an absolute path or ``@name``.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")


def notify(
    state: str | Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    fds: Sequence[int] = (),
    unset_environment: bool = False,
    environ: MutableMapping[str, str] | None = None,
    timeout: float | None = None,
) -> bool:
    """Send a notification to the service manager.

    Args:
        state: ``"READY=1\\nSTATUS=up"``, or assignments as a mapping/pairs.
        fds: fds to send along (``FDSTORE=1`` with ``FDNAME=``).
        unset_environment: remove ``NOTIFY_SOCKET`` afterwards.
        environ: environment to read; ``os.environ`` by default.
        timeout: give up after this many seconds if the receiver's queue is
            full (``0``: never block). ``None`` blocks, as sd_notify does.

    Returns:
        True if sent, False if there is no manager to tell.

    Raises:
        NotifyError: malformed message or address, or the send failed.
    """
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET")
    try:
        if not value:
            return False
        data = state.encode() if isinstance(state, str) else format_message(state)
        address = notify_address(value)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
                send_with_fds(sock, data, fds)
            except OSError as exc:
                reason = exc.strerror or "the receiver's queue is full"
                raise NotifyError(f"cannot notify {value}: {reason}") from exc
        return True
    finally:
        if unset_environment:
            env.pop("NOTIFY_SOCKET", None)


def ready(status: str | None = None) -> bool:
    """``READY=1``: the service has started and serves (optionally with ``STATUS=``)."""
    fields = [("READY", "1")]
    if status is not None:
        fields.append(("STATUS", status))
    return notify(fields)


def reloading(status: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=`` (as ``Type=notify-reload`` expects)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = [("RELOADING", "1"), ("MONOTONIC_USEC", str(usec))]
    if status is not None:
        fields.append(("STATUS", status))
    return notify(fields)


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: the service is shutting down."""
    fields = [("STOPPING", "1")]
    if status is not None:
        fields.append(("STATUS", status))
    return notify(fields)


def status(text: str) -> bool:
    """``STATUS=text``: a one-line human status."""
    return notify([("STATUS", text)])
