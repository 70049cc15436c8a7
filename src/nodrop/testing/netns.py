"""Private network namespaces for tests and benchmarks, and guarded sysctls.

Kernel features (migration sysctls, eBPF steering, nftables rules) are tested
for real, but never on the host: :func:`run_in_netns` starts a child Python
process that unshares a fresh network namespace (only ``lo``, brought up),
runs one function there and sends its JSON result back over a pipe. When the
child exits, the namespace and everything in it (sysctls, nft tables,
sockets) goes with it.

:func:`write_sysctl` refuses to write unless the calling process is in a
network namespace other than the one PID 1 is in -- a safety net against a
test or benchmark changing the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import importlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from nodrop.errors import NetnsError

__all__ = [
    "DEFAULT_TIMEOUT",
    "bring_up_loopback",
    "can_unshare_net",
    "in_private_netns",
    "read_sysctl",
    "run_in_netns",
    "unshare_net",
    "write_sysctl",
]

CLONE_NEWNET: Final = 0x40000000
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1

#: Seconds a :func:`run_in_netns` child may run before it is killed.
DEFAULT_TIMEOUT: Final = 60.0

_libc = ctypes.CDLL(None, use_errno=True)


def unshare_net() -> None:
    """Move the calling process into a new, empty network namespace.

    Call it before starting threads: unshare(2) moves the calling thread only.

    Raises:
        NetnsError: unshare(2) failed (EPERM without CAP_SYS_ADMIN...).
    """
    if _libc.unshare(ctypes.c_int(CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")


def bring_up_loopback() -> None:
    """Set ``lo`` up (a new namespace starts with it down): SIOCSIFFLAGS."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


#: Inode of the initial network namespace on recent kernels, which give the
#: initial namespaces fixed inode numbers (PROC_NET_INIT_INO); observed on 6.18.
INIT_NET_INO: Final = 0xEFFFFFF9
#: Set by :func:`run_in_netns` for its child: the inode of the namespace the
#: launcher was in, which the child must have left.
OUTER_NETNS_ENV: Final = "NODROP_OUTER_NETNS_INO"


def _netns_inode(pid: str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def in_private_netns() -> bool:
    """True if this process is, as far as it can tell, not in the host's
    network namespace.

    The test is: not the initial namespace's fixed inode, and not PID 1's
    namespace. Where PID 1's namespace cannot be read (a VM or container init
    that refuses ptrace access, as on the machine this was written on), a
    process started by :func:`run_in_netns` compares against the namespace its
    launcher was in instead. With neither, the guard fails closed (False).
    """
    me = _netns_inode("self")
    if me == INIT_NET_INO:
        return False
    try:
        return me != _netns_inode("1")
    except OSError:
        pass
    outer = os.environ.get(OUTER_NETNS_ENV, "")
    return outer.isdigit() and int(outer) != me


def _sysctl_path(name: str) -> Path:
    if not name or ".." in name or name.startswith(("/", ".")):
        raise NetnsError(0, f"bad sysctl name {name!r}")
    return Path("/proc/sys", *name.split("."))


def read_sysctl(name: str) -> str:
    """Read ``name`` (dotted, e.g. ``net.ipv4.tcp_migrate_req``) as seen from
    this process's network namespace.

    Raises:
        NetnsError: the sysctl does not exist or cannot be read.
    """
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot read sysctl {name}: {exc.strerror}") from exc


def write_sysctl(name: str, value: str | int) -> None:
    """Write a sysctl, only from a private network namespace.

    Raises:
        NetnsError: the caller is in the host's (PID 1's) network namespace,
            or the write failed.
    """
    if not in_private_netns():
        raise NetnsError(
            1, f"refusing to write sysctl {name}: this process is in the host's network namespace"
        )
    try:
        _sysctl_path(name).write_text(f"{value}\n")
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot write sysctl {name}: {exc.strerror}") from exc


# --- running a function in a child's private namespace -----------------------


def _resolve(target: str) -> Callable[..., Any]:
    """``pkg.module:func`` or ``/path/to/file.py:func`` -> the function."""
    where, sep, func = target.rpartition(":")
    if not sep or not where or not func:
        raise NetnsError(0, f"bad target {target!r}: want module:function or file.py:function")
    if where.endswith(".py"):
        name = "_nodrop_netns_" + Path(where).stem
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise NetnsError(0, f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn: Callable[..., Any] = getattr(module, func)
    return fn


def run_in_netns(target: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Run ``target(*args)`` in a child process inside a new network namespace.

    Args:
        target: ``pkg.module:func`` or ``/path/to/file.py:func``.
        args: strings passed to the function.
        timeout: seconds before the child is killed.

    Returns:
        The function's return value, which must be JSON-serialisable, decoded.

    Raises:
        NetnsError: the child could not enter a namespace, the function raised
            (the child's stderr is in the message), or the timeout passed.
    """
    rfd, wfd = os.pipe()  # both O_CLOEXEC; pass_fds clears it on wfd in the child
    cmd = [sys.executable, "-m", "nodrop.testing.netns", str(wfd), target, *args]
    try:
        env = {**os.environ, OUTER_NETNS_ENV: str(_netns_inode("self"))}
        # A session of its own: on timeout the whole group goes, including
        # processes the function started (they would otherwise keep the
        # pipes open and the namespace alive).
        with subprocess.Popen(
            cmd,
            pass_fds=(wfd,),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        ) as proc:
            os.close(wfd)
            wfd = -1
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)
                raise NetnsError(0, f"{target} timed out after {timeout}s in a netns") from exc
            with os.fdopen(rfd, "rb") as pipe:
                rfd = -1
                result = pipe.read()
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot start {sys.executable}: {exc.strerror}") from exc
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
    if proc.returncode != 0 or not result:
        tail = (err or out).decode(errors="replace").strip()[-4000:]
        raise NetnsError(0, f"{target} failed in a netns (exit {proc.returncode}):\n{tail}")
    return json.loads(result)


@functools.cache
def can_unshare_net() -> tuple[bool, str]:
    """Probe, with a real child, whether a private network namespace can be
    made here. Returns ``(ok, reason)``; the reason is worded for a test skip."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, this is {sys.platform}"
    try:
        run_in_netns("nodrop.testing.netns:_probe_child", timeout=30)
    except NetnsError as exc:
        last = str(exc).strip().splitlines()[-1]
        if "EPERM" in str(exc) or "not permitted" in str(exc):
            return False, f"cannot unshare a network namespace (needs root/CAP_SYS_ADMIN): {last}"
        return False, f"cannot unshare a network namespace: {last}"
    return True, "private network namespaces available"


def _probe_child() -> bool:
    return in_private_netns()


def main(argv: Sequence[str] | None = None) -> int:
    """Child side: ``python -m nodrop.testing.netns RESULT_FD TARGET [ARG...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m nodrop.testing.netns RESULT_FD TARGET [ARG...]", file=sys.stderr)
        return 2
    result_fd, target, args = int(argv[0]), argv[1], argv[2:]
    try:
        unshare_net()
        bring_up_loopback()
        value = _resolve(target)(*args)
        data = json.dumps(value).encode()
    except BaseException:
        traceback.print_exc()
        return 1
    with os.fdopen(result_fd, "wb") as out:
        out.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
