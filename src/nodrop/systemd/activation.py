"""systemd socket activation (``LISTEN_FDS``), the receiving side.

Follows the reference behaviour of systemd's ``sd_listen_fds_with_names``:

* no ``LISTEN_PID``, or one that is not our pid: not for us, no sockets;
* a malformed ``LISTEN_PID`` or ``LISTEN_FDS``: an error;
* ``LISTEN_FDNAMES`` absent: every fd is named ``"unknown"``; present with a
  different count than ``LISTEN_FDS``: an error;
* adopted fds (3, 4, ...) are made close-on-exec;
* when asked, the three variables are unset on every path, errors included.

The passing side (putting fds at 3.. and setting ``LISTEN_PID`` to the child's
own pid) is in :mod:`nodrop.systemd.spawn`.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from nodrop.errors import ActivationError
from nodrop.listeners.spec import fdname_is_valid

SD_LISTEN_FDS_START = 3
"""The first inherited fd, as in sd-daemon.h."""

LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_MAX_FDS = 2**31 - 1 - SD_LISTEN_FDS_START


@dataclass(frozen=True)
class InheritedSocket:
    """One socket passed by the service manager.

    Attributes:
        fd: its number (3, 4, ...).
        name: from ``LISTEN_FDNAMES``, or ``"unknown"``.
        socket: a ready-to-use socket object owning ``fd``.
    """

    fd: int
    name: str
    socket: socket.socket


def _parse_positive(var: str, value: str, allow_zero: bool) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise ActivationError(f"{var}={value!r} is not a number")
    number = int(text)
    if number == 0 and not allow_zero:
        raise ActivationError(f"{var}={value!r} must be positive")
    return number


def parse_listen_env(env: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """Decode the activation variables (pure).

    Args:
        env: the environment to read.
        pid: our pid; fds meant for another process are not ours.

    Returns:
        ``(fd, name)`` pairs, in order; empty when nothing is for us.

    Raises:
        ActivationError: malformed values.
    """
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return []
    if _parse_positive("LISTEN_PID", pid_text, allow_zero=False) != pid:
        return []
    fds_text = env.get("LISTEN_FDS")
    if fds_text is None:
        return []
    count = _parse_positive("LISTEN_FDS", fds_text, allow_zero=True)
    if count > _MAX_FDS:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is out of range")
    if count == 0:
        return []
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":")
        if len(names) != count:
            raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names but LISTEN_FDS={count}")
        for name in names:
            # systemd replaces nothing: an empty or invalid name is what the
            # manager sent. We accept it as given but never pass one on.
            if "\0" in name:
                raise ActivationError("LISTEN_FDNAMES contains a NUL byte")
    return [(SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def unset_listen_env(env: MutableMapping[str, str]) -> None:
    for var in LISTEN_VARIABLES:
        env.pop(var, None)


def listen_fds(
    unset_environment: bool = True, *, environ: MutableMapping[str, str] | None = None
) -> list[InheritedSocket]:
    """The sockets this process inherited from systemd, ``nodrop run`` or any
    manager speaking the protocol, in order.

    Args:
        unset_environment: remove ``LISTEN_PID``, ``LISTEN_FDS`` and
            ``LISTEN_FDNAMES`` afterwards (also when an error is raised), so
            that our own children don't see them.
        environ: the environment to use; ``os.environ`` by default.

    Returns:
        An empty list when no sockets were passed to this process.

    Raises:
        ActivationError: malformed variables, or a passed fd that is closed or
            not a socket.
    """
    env = os.environ if environ is None else environ
    try:
        pairs = parse_listen_env(env, os.getpid())
        result: list[InheritedSocket] = []
        for fd, name in pairs:
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                for item in result:
                    item.socket.detach()  # leave the fds as they were handed to us
                raise ActivationError(
                    f"inherited fd {fd} ({name}) is unusable: {exc.strerror}"
                ) from exc
            result.append(InheritedSocket(fd, name, sock))
        return result
    finally:
        if unset_environment:
            unset_listen_env(env)


def activation_env(names: Sequence[str]) -> dict[str, str]:
    """``LISTEN_FDS`` and ``LISTEN_FDNAMES`` for passing ``len(names)`` fds.

    ``LISTEN_PID`` is not here: only the child knows its pid after exec
    (see :mod:`nodrop.systemd.spawn`).

    Raises:
        ActivationError: a name systemd would not accept.
    """
    for name in names:
        if not fdname_is_valid(name):
            raise ActivationError(f"fd name {name!r} is not valid (1-255 printable chars, no ':')")
    env = {"LISTEN_FDS": str(len(names))}
    if names:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env
