"""SO_REUSEPORT listeners for servers that bind their own (no supervisor).

A server that binds its listener with SO_REUSEPORT can be replaced by simply
starting the new version beside it: the new process binds the same address,
joins the kernel's reuseport group, and the old one closes when it is done.
Two things decide whether that drops connections:

* while both are open, new connections are hashed across both, and the old
  one's accept queue is reset when it closes -- unless
* an eBPF steering program (:class:`nodrop.kernel.bpf.ReuseportSteering`) is
  attached to the group: then every new connection goes to the listener in
  its map's slot, and a closing listener's queue migrates there.

The steering's map and program must be reachable by the *next* process. Two
ways, both here:

* **pinning** (the default for ``listen(..., steering=DIR)``): the map and
  program are pinned as files under ``DIR`` (no dots in its names: bpffs
  refuses them) on a bpf filesystem
  (``mount -t bpf bpf /sys/fs/bpf``) with ``BPF_OBJ_PIN``; the next process
  opens them with ``BPF_OBJ_GET``, attaches the same program through its own
  socket and puts its socket in the slot (:meth:`Listener.take_over`);
* **fd passing**: hand ``steering.fds`` to the new process (as extra
  inherited fds or over SCM_RIGHTS) and rebuild it there with
  :meth:`SharedSteering.from_fds`.

Usage::

    from nodrop.reuseport import listen
    [web] = listen("tcp://0.0.0.0:8000", steering="/sys/fs/bpf/myapp")
    # new connections and the previous version's queue now come to `web`
    ... serve web.sock ...; on SIGTERM: stop accepting, finish, exit.

Needs CAP_BPF (or CAP_SYS_ADMIN) for the steering; without ``steering`` it is
a plain SO_REUSEPORT bind (and, unless ``net.ipv4.tcp_migrate_req=1``, the
old process's queued connections may be reset when it closes).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from nodrop.errors import BindError, BpfError
from nodrop.kernel.bpf import socket_cookie
from nodrop.kernel.bpf_pin import SharedSteering
from nodrop.listeners.bind import BindTarget, bind, resolve
from nodrop.listeners.identity import format_address
from nodrop.listeners.spec import ListenerSpec, parse_spec

__all__ = ["Listener", "join_steering", "listen", "pin_dir_for"]


def pin_dir_for(base: str | os.PathLike[str], target: BindTarget) -> Path:
    """Where one address's steering is pinned under ``base`` (pure):
    ``tcp_127-0-0-1_8000``, ``udp_--1_53`` (bpffs refuses names with a dot)."""
    kind = "tcp" if target.type == socket.SOCK_STREAM else "udp"
    address = format_address(target.address).replace("[", "").replace("]", "")
    host, _, port = address.rpartition(":")
    host = host.replace(".", "-").replace(":", "-").replace("%", "-")
    return Path(base) / f"{kind}_{host}_{port}"


def join_steering(sock: socket.socket, pin_dir: str | os.PathLike[str]) -> SharedSteering:
    """The steering of ``sock``'s reuseport group, shared through ``pin_dir``.

    Opens the pinned steering if there is one (an earlier process made it),
    else creates and pins it; either way attaches the program through ``sock``
    (the same program again is harmless, and a group re-created after every
    socket closed needs it). Does not change which listener is active.

    Raises:
        BpfError: no CAP_BPF, ``pin_dir`` not on a bpf filesystem...
    """
    for _ in range(3):  # bounded: another process may pin between our get and pin
        try:
            steering = SharedSteering.open_pinned(pin_dir)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            steering = SharedSteering()
            try:
                steering.pin(pin_dir)
            except BpfError as pin_exc:
                steering.close()
                if pin_exc.errno == errno.EEXIST:
                    continue  # lost the race: open theirs
                raise
        try:
            steering.attach(sock)
        except BaseException:
            steering.close()
            raise
        return steering
    raise BpfError(errno.EEXIST, f"cannot open or pin the steering in {pin_dir}")


@dataclass
class Listener:
    """One bound SO_REUSEPORT socket and, if asked for, its group's steering."""

    sock: socket.socket
    steering: SharedSteering | None = None

    def take_over(self) -> None:
        """Make this listener the active one of its group: new connections,
        and the queue of any listener of the group that closes, come here.
        Without steering, does nothing (the kernel hashes)."""
        if self.steering is not None and not self.is_active():
            self.steering.steer_to(self.sock)

    def is_active(self) -> bool:
        """True if the group's steering points at this listener."""
        return self.steering is not None and self.steering.active_cookie() == socket_cookie(
            self.sock
        )

    def close(self) -> None:
        """Close the socket and this process's steering fds (the group keeps
        its program; the pinned files stay for the next process)."""
        self.sock.close()
        if self.steering is not None:
            self.steering.close()


def listen(
    spec: str | ListenerSpec,
    *,
    steering: str | os.PathLike[str] | None = None,
    take_over: bool = True,
) -> list[Listener]:
    """Bind SO_REUSEPORT listeners for ``spec``; join and take over the group's steering.

    Args:
        spec: ``tcp://HOST:PORT``, ``udp://HOST:PORT`` (options as in
            :mod:`nodrop.listeners.spec`); a name may resolve to several addresses,
            hence the list.
        steering: a directory on a bpf filesystem; each address's steering
            is pinned in a subdirectory (:func:`pin_dir_for`). ``None``: no
            steering.
        take_over: make the new listeners active at once (call
            :meth:`Listener.take_over` later, once ready, otherwise).

    Returns:
        One :class:`Listener` per address, close-on-exec, blocking.

    Raises:
        BindError: cannot bind. BpfError: the steering cannot be joined.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    out: list[Listener] = []
    try:
        for target in resolve(parsed):
            if target.family == socket.AF_UNIX:
                raise BindError(errno.EINVAL, f"{parsed}: unix sockets have no SO_REUSEPORT groups")
            sock = bind(target, reuseport=True)
            listener = Listener(sock)
            out.append(listener)
            if steering is not None:
                bound = BindTarget(
                    target.spec, target.family, target.type, target.protocol, sock.getsockname()
                )
                listener.steering = join_steering(sock, pin_dir_for(steering, bound))
                if take_over:
                    listener.take_over()
    except BaseException:
        for listener in out:
            listener.close()
        raise
    return out
