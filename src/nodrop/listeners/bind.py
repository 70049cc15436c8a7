"""Creating listeners from specs: resolution, socket options, bind, listen.

Host names are resolved here, at bind time. A name that resolves to several
addresses (``localhost`` -> ``127.0.0.1`` and ``::1``) yields one listener per
distinct address, all with the spec's name and options, the way nginx treats
``listen localhost:80``. If any of them cannot be bound, the whole spec fails:
a half-bound name would serve some clients and refuse others.

Every socket is created close-on-exec (Python's default); which fds a child
inherits is decided per spawn.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nodrop.errors import BindError
from nodrop.listeners.identity import Address, canonical_address
from nodrop.listeners.spec import ListenerOptions, ListenerSpec, Transport

GetAddrInfo = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True)
class BindTarget:
    """One concrete address to listen on, derived from a spec."""

    spec: ListenerSpec
    family: int
    type: int
    protocol: int
    sockaddr: Any

    @property
    def address(self) -> Address:
        return canonical_address(self.family, self.sockaddr)

    @property
    def key(self) -> tuple[int, int, int, Address]:
        """The identity key a socket bound to this target will report."""
        return (self.family, self.type, self.protocol, self.address)

    @property
    def name(self) -> str:
        return self.spec.options.name or "unknown"

    @property
    def options(self) -> ListenerOptions:
        return self.spec.options

    @property
    def wildcard_port(self) -> bool:
        """Port 0: the kernel picks one, so no existing socket can match."""
        return self.family in (socket.AF_INET, socket.AF_INET6) and self.sockaddr[1] == 0


def resolve(spec: ListenerSpec, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> list[BindTarget]:
    """Turn a spec into the concrete addresses to bind.

    Raises:
        BindError: the host name does not resolve.
    """
    if spec.transport is Transport.UNIX:
        if spec.abstract is not None:
            sockaddr: Any = "\0" + spec.abstract
        else:
            assert spec.path is not None
            sockaddr = os.path.abspath(spec.path)
        return [BindTarget(spec, socket.AF_UNIX, socket.SOCK_STREAM, 0, sockaddr)]
    sock_type = socket.SOCK_STREAM if spec.transport is Transport.TCP else socket.SOCK_DGRAM
    proto = socket.IPPROTO_TCP if spec.transport is Transport.TCP else socket.IPPROTO_UDP
    try:
        infos = getaddrinfo(spec.host, spec.port, 0, sock_type, proto, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"{spec}: cannot resolve {spec.host!r}: {exc.strerror}") from exc
    targets: list[BindTarget] = []
    seen: set[Any] = set()
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        target = BindTarget(spec, family, sock_type, proto, tuple(sockaddr))
        if target.address not in seen:
            seen.add(target.address)
            targets.append(target)
    if not targets:
        raise BindError(f"{spec}: {spec.host!r} resolves to no IPv4 or IPv6 address")
    return targets


def resolve_all(
    specs: Iterable[ListenerSpec], getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> list[BindTarget]:
    """Resolve several specs; duplicates (same address twice) are an error."""
    targets: list[BindTarget] = []
    seen: dict[Any, BindTarget] = {}
    for spec in specs:
        for target in resolve(spec, getaddrinfo):
            if not target.wildcard_port and target.key in seen:
                raise BindError(
                    f"{spec} and {seen[target.key].spec} both listen on "
                    f"{target.sockaddr!r}; give each address once"
                )
            seen[target.key] = target
            targets.append(target)
    return targets


def apply_live_options(sock: socket.socket, options: ListenerOptions) -> None:
    """Options that may change on a socket that is already listening.

    A reload that only changes the backlog, TCP_FASTOPEN or TCP_DEFER_ACCEPT
    keeps the same kernel socket: calling listen(2) again updates the backlog
    in place, and both TCP options can be set at any time.
    """
    if sock.type == socket.SOCK_STREAM:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            if options.fastopen is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, options.fastopen)
            if options.defer_accept is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, options.defer_accept)
        sock.listen(options.backlog)


def _bind_error(target: BindTarget, exc: OSError) -> BindError:
    where = target.spec.text or str(target.spec)
    hint = {
        errno.EADDRINUSE: " (another process listens there; stop it or use reuseport=1 on both)",
        errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        errno.EADDRNOTAVAIL: " (no interface has this address)",
    }.get(exc.errno or 0, "")
    err = BindError(exc.errno or 0, f"cannot listen on {where}: {exc.strerror}{hint}")
    return err


def _unix_path_in_use(path: str) -> bool:
    """True if a live process accepts on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def _bind_unix_path(sock: socket.socket, target: BindTarget) -> None:
    path: str = target.sockaddr
    options = target.options
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(errno.EEXIST, f"cannot listen on {path}: exists and is not a socket")
        if _unix_path_in_use(path):
            raise BindError(errno.EADDRINUSE, f"cannot listen on {path}: a process listens there")
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket file: nobody accepts on it
    # The file is created with the process umask. Bind under a umask that
    # leaves it owner-only, then widen to the asked mode: the path never
    # exists with more permission than asked for. (getsockname must report the
    # real path, so binding elsewhere and renaming is not an option.)
    old_umask = os.umask(0o177) if options.mode is not None else None
    try:
        sock.bind(path)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    try:
        if options.mode is not None:
            os.chmod(path, options.mode)
        if options.owner is not None or options.group is not None:
            os.chown(path, _uid(options.owner), _gid(options.group))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _uid(owner: str | None) -> int:
    if owner is None:
        return -1
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise BindError(errno.EINVAL, f"no such user {owner!r}") from None


def _gid(group: str | None) -> int:
    if group is None:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise BindError(errno.EINVAL, f"no such group {group!r}") from None


def bind(target: BindTarget, *, reuseport: bool | None = None) -> socket.socket:
    """Create, configure, bind and (for stream sockets) listen.

    Args:
        target: from :func:`resolve`.
        reuseport: override the spec's ``reuseport`` option (the reuseport
            strategy binds every generation's listeners with it).

    Returns:
        A close-on-exec, blocking socket.

    Raises:
        BindError: with the address and a hint (port in use, permission...).
    """
    options = target.options
    sock = socket.socket(target.family, target.type, target.protocol)
    try:
        if target.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport if reuseport is not None else options.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if target.family == socket.AF_INET6 and options.v6only is not None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(options.v6only))
        if target.family == socket.AF_UNIX and target.spec.path is not None:
            _bind_unix_path(sock, target)
        else:
            sock.bind(target.sockaddr)
        if target.type == socket.SOCK_STREAM:
            apply_live_options(sock, options)
    except BindError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise _bind_error(target, exc) from exc
    return sock


def bind_all(
    targets: Iterable[BindTarget], *, reuseport: bool | None = None
) -> list[tuple[BindTarget, socket.socket]]:
    """Bind every target, or none: on the first failure the others are closed."""
    bound: list[tuple[BindTarget, socket.socket]] = []
    try:
        for target in targets:
            bound.append((target, bind(target, reuseport=reuseport)))
    except BaseException:
        for _, sock in bound:
            sock.close()
        raise
    return bound
