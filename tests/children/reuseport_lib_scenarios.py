"""Library-side scenarios (nodrop.reuseport), run inside a private network
namespace by run_in_netns, after also entering a private mount namespace
where a bpf filesystem is mounted on a temporary directory: nothing is pinned
or mounted on the host."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import tempfile
import time
from typing import Any

from nodrop.errors import BpfError
from nodrop.kernel.bpf_pin import SharedSteering, is_on_bpffs
from nodrop.reuseport import listen
from nodrop.testing.netns import in_private_netns

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_bpffs() -> str:
    """Enter a private mount namespace and mount a bpffs on a new temp dir."""
    if not in_private_netns():
        raise RuntimeError("refusing to run outside a private network namespace")
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    where = tempfile.mkdtemp(prefix="nodrop-bpffs-")
    _check(_libc.mount(b"bpf", where.encode(), b"bpf", 0, None), "mount -t bpf")
    return where


def accepted(sock: socket.socket, want: int, timeout: float = 5.0) -> int:
    """Accept until ``want`` connections came (or ``timeout``); the count."""
    deadline = time.monotonic() + timeout
    n = 0
    while n < want:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        conn, _ = sock.accept()
        conn.close()
        n += 1
    # and nothing more than that is waiting
    while select.select([sock], [], [], 0)[0]:
        sock.accept()[0].close()
        n += 1
    return n


def connect_all(port: int, n: int) -> list[socket.socket]:
    """Connect ``n`` clients; each handshake completes (queued, not accepted)."""
    out = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.append(c)
    return out


def takeover() -> dict[str, Any]:
    base = private_bpffs()
    out: dict[str, Any] = {"on_bpffs": is_on_bpffs(base), "tmp_on_bpffs": is_on_bpffs("/tmp")}
    # process "A": first in the group, creates and pins the steering
    [a] = listen("tcp://127.0.0.1:0?backlog=64", steering=base)
    port = a.sock.getsockname()[1]
    out["a_active"] = a.is_active()
    out["pinned"] = sorted(os.listdir(os.path.join(base, f"tcp_127-0-0-1_{port}")))
    queued = connect_all(port, 8)  # queued on A, never accepted by A
    # process "B": joins through the pinned objects (fresh fds from
    # BPF_OBJ_GET), takes over
    [b] = listen(f"tcp://127.0.0.1:{port}", steering=base)
    assert b.steering is not None
    assert a.steering is not None
    out["b_fds_differ"] = set(b.steering.fds).isdisjoint(a.steering.fds)
    out["b_active"], out["a_still_active"] = b.is_active(), a.is_active()
    fresh = connect_all(port, 12)  # new connections: all to B although A is open
    out["a_queue_before_close"] = len(queued)
    out["b_got_new"] = accepted(b.sock, len(fresh))
    # A closes with 8 connections in its accept queue: they migrate to B
    a.close()
    out["b_got_migrated"] = accepted(b.sock, len(queued))
    # a third process re-attaches to the same group via the pin
    [c] = listen(f"tcp://127.0.0.1:{port}", steering=base, take_over=False)
    out["c_active_before"], out["b_active_before_c"] = c.is_active(), b.is_active()
    c.take_over()
    out["c_active_after"] = c.is_active()
    # fd passing instead of pinning
    assert c.steering is not None
    passed = SharedSteering.from_fds(*c.steering.fds)
    out["from_fds_cookie_ok"] = passed.active_cookie() == c.steering.active_cookie()
    passed.close()
    # not on a bpffs: a clear error
    try:
        listen("tcp://127.0.0.1:0", steering="/tmp/not-bpffs")
        out["not_bpffs"] = "no error"
    except BpfError as exc:
        out["not_bpffs"] = [exc.errno == errno.EOPNOTSUPP, str(exc)]
    for s in queued + fresh:
        s.close()
    b.close()
    c.close()
    SharedSteering.unpin(os.path.join(base, f"tcp_127-0-0-1_{port}"))
    out["unpinned"] = not os.path.exists(os.path.join(base, f"tcp_127-0-0-1_{port}"))
    return out
