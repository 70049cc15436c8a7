"""Starting a child with sockets at fds 3.. and ``LISTEN_PID`` = its own pid.

Python's ``subprocess`` cannot do this: it cannot move fds to chosen numbers,
and ``LISTEN_PID`` must equal the pid *after* exec, which only the child knows
(``preexec_fn`` could set it, but it is unsafe in a process with threads).
nodrop uses ``posix_spawn`` (vfork-fast, thread-safe), whose file actions put
each socket at its number, and a tiny exec shim: ``/bin/sh -c`` sets
``LISTEN_PID=$$`` and ``exec``s the command, so the pid it sets is the pid the
command will have. Where there is no ``/bin/sh`` (distroless images) the shim
is the Python interpreter running nodrop.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from nodrop.systemd.activation import SD_LISTEN_FDS_START, activation_env

SH = "/bin/sh"

# $0 is a label for ps; "$@" is the command. With a working directory, $1 is
# it: the shim changes into it (resolving it at that moment) before the exec.
_SH_SHIM = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_SH_CD_SHIM = 'cd -P -- "$1" || exit 126; shift; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_PY_SHIM = (
    "import os,sys;os.environ['LISTEN_PID']=str(os.getpid());os.execvp(sys.argv[1],sys.argv[1:])"
)
_PY_CD_SHIM = (
    "import os,sys;os.chdir(sys.argv[1]);os.environ['PWD']=os.getcwd();"
    "os.environ['LISTEN_PID']=str(os.getpid());os.execvp(sys.argv[2],sys.argv[2:])"
)

# Signals a child must start with at their default disposition even if we
# ignore them (handled ones are reset by exec anyway).
_DEFAULT_SIGNALS = frozenset(
    {
        signal.SIGPIPE,
        signal.SIGXFSZ,
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGCHLD,
    }
)


def shim_argv(argv: Sequence[str], shell: str | None = SH, cwd: str | None = None) -> list[str]:
    """The argv that runs ``argv`` with ``LISTEN_PID`` set to its own pid, in
    ``cwd`` if given (pure)."""
    if cwd is not None:
        if shell is not None:
            return [shell, "-c", _SH_CD_SHIM, "nodrop-exec", cwd, *argv]
        return [sys.executable, "-c", _PY_CD_SHIM, cwd, *argv]
    if shell is not None:
        return [shell, "-c", _SH_SHIM, "nodrop-exec", *argv]
    return [sys.executable, "-c", _PY_SHIM, *argv]


_strays_handled = False


def close_strays_on_exec() -> None:
    """Mark every fd above 2 close-on-exec.

    Python creates its own fds close-on-exec, but fds inherited from *our*
    parent (a shell, a CI runner) are not, and posix_spawn has no closefrom:
    without this they would leak into every worker. Passed fds are dup2'ed
    into place after, so they are unaffected.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # the listdir's own fd, already gone


def _find_shell() -> str | None:
    return SH if os.access(SH, os.X_OK) else None


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    fds: Sequence[int] = (),
    names: Sequence[str] | None = None,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    process_group: bool = True,
    cwd: str | None = None,
    keep: Sequence[int] = (),
) -> int:
    """Start ``argv`` with ``fds`` passed systemd-style.

    Args:
        argv: the command; looked up in ``env["PATH"]``.
        env: the child's environment, without the activation variables
            (they are added here).
        fds: fds to pass, in order; they appear at 3, 4, ... in the child.
        names: ``LISTEN_FDNAMES`` entries, one per fd (default "unknown").
        stdin, stdout, stderr: fds for the child's 0, 1, 2 (default: ours).
        process_group: put the child in a new process group of its own, so
            it and its descendants can be signalled together.
        cwd: the child's working directory (default: ours). The shim changes
            into it, so a relative command path (``venv/bin/python``) is
            looked up there; a missing directory makes the child exit 126.
        keep: more fds for the child, right after ``fds`` (at 3 + len(fds),
            ...) but not counted in ``LISTEN_FDS``: what it must hold without
            knowing (nodrop's recovery keeps the read ends of the worker's own
            output pipes there, see docs/recovery.md).

    Returns:
        The child's pid (also the pid the command has after the shim's exec).

    Raises:
        OSError: the shim could not be started (the command itself not being
            found shows up as the child exiting with status 127).
    """
    if not argv:
        raise ValueError("empty command")
    child_env = {
        k: v for k, v in env.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    }
    fds = list(fds)
    if fds:
        child_env.update(
            activation_env(list(names) if names is not None else ["unknown"] * len(fds))
        )
        program = shim_argv(argv, _find_shell(), cwd)
    elif cwd is not None:
        program = shim_argv(argv, _find_shell(), cwd)
    else:
        program = list(argv)
        if "/" not in program[0]:
            program = shim_argv(argv, _find_shell())  # let the shell/execvp search PATH
    global _strays_handled
    if not _strays_handled:
        # Once per process: fds we create later are close-on-exec already.
        close_strays_on_exec()
        _strays_handled = True
    # Copy the fds above the target range first: a source that already sits at
    # its target number would otherwise keep FD_CLOEXEC (dup2(fd, fd) is a
    # no-op), and one sitting at another target would be overwritten.
    placed = [*fds, *keep]
    floor = SD_LISTEN_FDS_START + len(placed)
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in placed]
    actions: list[tuple[int, int, int]] = []
    try:
        for std_fd, src in ((0, stdin), (1, stdout), (2, stderr)):
            if src is not None:
                temp = fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, floor)
                temps.append(temp)
                actions.append((os.POSIX_SPAWN_DUP2, temp, std_fd))
        for i, temp in enumerate(temps[: len(placed)]):
            actions.append((os.POSIX_SPAWN_DUP2, temp, SD_LISTEN_FDS_START + i))
        if process_group:
            return os.posix_spawn(
                program[0],
                program,
                child_env,
                file_actions=actions,
                setpgroup=0,
                setsigmask=(),
                setsigdef=_DEFAULT_SIGNALS,
            )
        return os.posix_spawn(
            program[0],
            program,
            child_env,
            file_actions=actions,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS,
        )
    finally:
        for temp in temps:
            os.close(temp)
