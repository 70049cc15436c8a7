"""The control directory: where default control sockets live, and why we
trust it.

``$XDG_RUNTIME_DIR/nodrop``, else ``/run/nodrop`` for root, else
``/tmp/nodrop-UID`` -- a predictable name in a directory every local user
can write. Another user could create it first, world-writable, and put a
socket of theirs in it: a ``nodrop reload`` would then believe whatever that
socket answers. So the directory is created 0700, and an existing one is used
only if it is a real directory (not a symlink), owned by us, and writable by
nobody else (:func:`ensure_private_dir`, :func:`check_private_dir`);
otherwise nodrop refuses with one line naming it.

An explicit ``--control PATH`` (or ``$NODROP_CONTROL``) is the user's
choice (a Kubernetes ``emptyDir`` is 0777); its directory is not checked,
but every client still checks that the socket's peer runs as its own uid
(:func:`nodrop.supervisor.control.request`), so a swapped socket can deny
service but not forge an answer. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Mapping

from nodrop.errors import UntrustedError


def default_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The control directory of this user (pure, given the environment and uid)."""
    env = os.environ if environ is None else environ
    euid = os.geteuid() if uid is None else uid
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "nodrop")
    if euid == 0:
        return "/run/nodrop"
    return f"/tmp/nodrop-{euid}"


def is_default(path: str) -> bool:
    """Whether the socket ``path`` lives in the default control directory."""
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(default_dir())


def why_untrusted(st: os.stat_result, uid: int) -> str | None:
    """What is wrong with a directory for holding our control sockets (pure):
    None when nothing is."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by us (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private_dir(directory: str, lstat: Callable[[str], os.stat_result] = os.lstat) -> bool:
    """Refuse ``directory`` unless it is ours (see the module docstring).

    Returns:
        False if it does not exist (nothing to trust or distrust yet).

    Raises:
        UntrustedError: naming the directory and what is wrong with it.
    """
    try:
        st = lstat(directory)
    except FileNotFoundError:
        return False
    problem = why_untrusted(st, os.geteuid())
    if problem is not None:
        raise UntrustedError(
            f"control directory {directory} {problem}: refusing to use it "
            "(remove it, or give --control PATH in a directory of yours)"
        )
    return True


def ensure_private_dir(directory: str) -> None:
    """Create ``directory`` 0700 if absent (its parents as needed), else check it.

    Raises:
        UntrustedError: it exists and is not ours.
        OSError: it cannot be created.
    """
    if check_private_dir(directory):
        return
    parent = os.path.dirname(directory)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    # Someone may make it between our lstat and mkdir: then theirs is checked.
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    check_private_dir(directory)
