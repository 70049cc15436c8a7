"""Process file descriptors: a handle on a process that no pid reuse can
fool, and ``pidfd_getfd(2)`` to copy an fd out of another process.

A recovering supervisor uses them on the workers its dead predecessor left
behind (:mod:`nodrop.supervisor.takeover`): it is not their parent, so it
cannot ``waitpid`` them, but a pidfd becomes readable when the process
exits, signals sent through it never reach a recycled pid, and
``pidfd_getfd`` takes their listening sockets and output pipes (kernel 5.6;
the caller needs ``PTRACE_MODE_ATTACH`` over the target: same uid without
Yama's restriction, or CAP_SYS_PTRACE as root has).
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["getfd", "open_process", "send_signal", "start_time"]

PIDFD_GETFD_NR = 438
"""pidfd_getfd(2): the same number on every architecture (the generic table)."""

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def getfd(pidfd: int, target_fd: int) -> int:
    """A copy of fd ``target_fd`` of the process ``pidfd`` refers to, as a new
    close-on-exec fd of ours.

    Raises:
        OSError: ESRCH (it exited), EBADF (no such fd), EPERM (not allowed).
    """
    ret = int(
        _syscall(
            ctypes.c_long(PIDFD_GETFD_NR),
            ctypes.c_long(pidfd),
            ctypes.c_long(target_fd),
            ctypes.c_long(0),
        )
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {target_fd}): {os.strerror(err)}")
    return ret


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat``
    field 22); None if there is no such process. With the pid, it names one
    process for the life of the machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def open_process(pid: int, started: int) -> int | None:
    """A pidfd of ``pid`` if it is still the process that started at
    ``started`` (see :func:`start_time`), else None."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after the open: the pidfd pins this process, so a pid recycled
    # before it shows a different start time, never after.
    if start_time(pid) != started:
        os.close(pidfd)
        return None
    return pidfd


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal the process; False if it has exited already."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    return True
