"""Socket creation, kernel-reported identity, and reconciliation."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodrop.errors import BindError
from nodrop.listeners.bind import BindTarget, bind, bind_all, resolve, resolve_all
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import SocketIdentity, canonical_address, format_address, identify
from nodrop.listeners.reconcile import Registry, pin_wildcard_ports, plan
from nodrop.listeners.spec import parse_spec


def targets(*specs: str) -> list[BindTarget]:
    return resolve_all([parse_spec(s) for s in specs])


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry()
    yield reg
    reg.close()


def inode(sock: socket.socket) -> int:
    """The kernel socket's inode: the same number means the same socket."""
    return os.fstat(sock.fileno()).st_ino


# -- identity ------------------------------------------------------------------


CANONICAL = [
    (socket.AF_INET, ("127.0.0.1", 80), ("inet", "127.0.0.1", 80)),
    (socket.AF_INET6, ("::0001", 80, 0, 0), ("inet6", "::1", 80, 0)),
    (socket.AF_INET6, ("fe80::1%2", 80, 0, 2), ("inet6", "fe80::1", 80, 2)),
    (socket.AF_UNIX, "/run/a.sock", ("unix", "/run/a.sock")),
    (socket.AF_UNIX, b"\0abs", ("abstract", "abs")),
    (socket.AF_UNIX, "\0abs", ("abstract", "abs")),
    (socket.AF_UNIX, "", ("unnamed",)),
]


@pytest.mark.parametrize(("family", "raw", "expected"), CANONICAL)
def test_canonical_address(family: int, raw: Any, expected: tuple[Any, ...]) -> None:
    assert canonical_address(family, raw) == expected


def test_format_address() -> None:
    assert format_address(("inet6", "::1", 80, 0)) == "[::1]:80"
    assert format_address(("abstract", "x")) == "@x"


def test_identity_of_tcp_udp_unix(tmp_path: Path) -> None:
    for spec in ("tcp://127.0.0.1:0?reuseport=1", "tcp://[::1]:0", "udp://127.0.0.1:0"):
        (target,) = targets(spec)
        with bind(target) as sock:
            ident = identify(sock)
            assert ident.family == target.family
            assert ident.type == target.type
            assert ident.protocol == target.protocol
            assert ident.address[2] == sock.getsockname()[1]
            assert ident.listening is (target.type == socket.SOCK_STREAM)
            assert ident.reuseport is ("reuseport" in spec)
            # The raw-fd path asks the same kernel and neither closes nor adopts it.
            assert identify(sock.fileno()) == ident
    path = tmp_path / "s.sock"
    with bind(*targets(f"unix:{path}")) as sock:
        assert identify(sock).address == ("unix", str(path))
        assert str(identify(sock)) == f"unix/stream {path} (listening)"


def test_identity_of_not_a_socket(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f, pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked below
        identify(f.fileno())
    assert info.value.errno == errno.ENOTSOCK


def test_localhost_and_127_0_0_1_are_the_same_listener() -> None:
    with bind(*targets("tcp://127.0.0.1:0")) as sock:
        port = sock.getsockname()[1]
        typed_other_way = [
            t for t in targets(f"tcp://localhost:{port}") if t.family == socket.AF_INET
        ]
        assert typed_other_way[0].key == identify(sock).key


WIRE_BAD = [
    None,
    [],
    [2, 1, 6, 1],
    [2, 1, 6, 1, "inet", "127.0.0.1"],
    [2, 1, 6, 1, "inet", 5, 80],
    [2, 1, 6, 1, "bogus"],
    [2, 1, -6, 1, "inet", "127.0.0.1", 80],
    [True, 1, 6, 1, "inet", "127.0.0.1", 80],
    [2, 1, 6, 9, "inet", "127.0.0.1", 80],
    [2, 1, 6, 1, "inet6", "::1", 80],
    [2, 1, 6, 1, "unnamed", "x"],
    (2, 1, 6, 1, "unix", "/x"),
]


@pytest.mark.parametrize("value", WIRE_BAD)
def test_identity_wire_rejects_malformed(value: object) -> None:
    with pytest.raises(ValueError, match=r"^identity (must be a list|address|numbers)"):
        SocketIdentity.from_wire(value)


@pytest.mark.parametrize(
    "address",
    [
        ("inet6", "::1", 80, 3),
        ("inet", "10.0.0.1", 1),
        ("unix", "/x"),
        ("abstract", "a"),
        ("unnamed",),
    ],
)
def test_identity_wire_round_trip(address: tuple[Any, ...]) -> None:
    ident = SocketIdentity(10, 1, 6, address, True, True)
    assert SocketIdentity.from_wire(ident.to_wire()) == ident


# -- resolution and binding ----------------------------------------------------


def fake_getaddrinfo(*results: tuple[int, Any]) -> Any:
    def gai(host: str, port: int, family: int, type_: int, proto: int, flags: int) -> list[Any]:
        return [(fam, type_, proto, "", addr) for fam, addr in results]

    return gai


def test_name_with_several_addresses_gives_one_listener_each() -> None:
    gai = fake_getaddrinfo(
        (socket.AF_INET6, ("::1", 80, 0, 0)),
        (socket.AF_INET, ("127.0.0.1", 80)),
        (socket.AF_INET, ("127.0.0.1", 80)),  # duplicates collapse
    )
    got = resolve(parse_spec("tcp://localhost:80?name=web"), gai)
    assert [t.address for t in got] == [("inet6", "::1", 80, 0), ("inet", "127.0.0.1", 80)]
    assert {t.name for t in got} == {"web"}


def test_unresolvable_name() -> None:
    def gai(*_: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(BindError, match=r"cannot resolve 'nowhere\.invalid'"):
        resolve(parse_spec("tcp://nowhere.invalid:80"), gai)


def test_same_address_twice_is_an_error() -> None:
    with pytest.raises(BindError, match="both listen on"):
        targets("tcp://127.0.0.1:8123", "tcp://127.0.0.1:8123?name=x")


def test_options_are_applied() -> None:
    (target,) = targets("tcp://[::1]:0?v6only=1&fastopen=17&defer_accept=3&reuseport=1")
    with bind(target) as sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 17
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert not sock.get_inheritable(), "listeners must be close-on-exec"


def test_port_in_use_is_a_clear_error() -> None:
    with bind(*targets("tcp://127.0.0.1:0")) as sock:
        port = sock.getsockname()[1]
        with pytest.raises(BindError) as info:
            bind(*targets(f"tcp://127.0.0.1:{port}"))
        assert info.value.errno == errno.EADDRINUSE
        assert f"tcp://127.0.0.1:{port}" in str(info.value)
        assert "another process listens there" in str(info.value)


def test_bind_all_is_all_or_nothing() -> None:
    with bind(*targets("tcp://127.0.0.1:0")) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(BindError):
            bind_all(targets("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{port}"))
    # no fd leaked: the autouse fixture checks that the first socket was closed


def test_unix_socket_mode_and_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with bind(*targets(f"unix:{path}?mode=0640")) as first:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with pytest.raises(BindError, match="a process listens there"):
            bind(*targets(f"unix:{path}"))
        first_ino = inode(first)
    # The first socket is closed, its file stays: a stale file is replaced.
    assert path.exists()
    with bind(*targets(f"unix:{path}")) as second:
        assert inode(second) != first_ino
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()


def test_unix_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(BindError, match="not a socket"):
        bind(*targets(f"unix:{path}"))


def test_abstract_socket() -> None:
    name = f"nodrop-test-{os.getpid()}"
    with bind(*targets(f"unix:@{name}")) as sock:
        assert identify(sock).address == ("abstract", name)


# -- reconciliation ------------------------------------------------------------


def fake_held(address: tuple[Any, ...], name: str = "x") -> HeldSocket:
    ident = SocketIdentity(socket.AF_INET, socket.SOCK_STREAM, 6, address, True, False)
    return HeldSocket(None, ident, name)  # type: ignore[arg-type]


def test_plan_is_pure_and_exact() -> None:
    a, b = fake_held(("inet", "127.0.0.1", 1001)), fake_held(("inet", "127.0.0.1", 1002))
    wanted = targets("tcp://127.0.0.1:1002", "tcp://127.0.0.1:1003", "tcp://127.0.0.1:0")
    result = plan([a, b], wanted)
    assert [(t.sockaddr, h) for t, h in result.keep] == [(("127.0.0.1", 1002), b)]
    assert [t.sockaddr for t in result.bind] == [("127.0.0.1", 1003), ("127.0.0.1", 0)]
    assert result.close == (a,)


def test_registry_config_change_keeps_the_same_kernel_socket(registry: Registry) -> None:
    first, removed = registry.apply(targets("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    assert removed == []
    kept_port = first[0].identity.address[2]
    gone_port = first[1].identity.address[2]
    kept_inode = inode(first[0].sock)
    current, removed = registry.apply(
        targets(f"tcp://127.0.0.1:{kept_port}?name=web&backlog=16", "udp://127.0.0.1:0")
    )
    assert inode(current[0].sock) == kept_inode
    assert current[0].name == "web"
    assert [h.identity.address[2] for h in removed] == [gone_port]
    for held in removed:
        held.sock.close()
    assert current[1].identity.type == socket.SOCK_DGRAM


def test_port_zero_keeps_its_socket_while_the_spec_is_unchanged(registry: Registry) -> None:
    wanted = targets("tcp://127.0.0.1:0?name=a")
    (first,), _ = registry.apply(wanted)
    (again,), removed = registry.apply(targets("tcp://127.0.0.1:0?name=a"))
    assert again is first
    assert removed == []
    (other,), removed = registry.apply(targets("tcp://127.0.0.1:0?name=b"))
    assert other is not first
    assert removed == [first]
    first.sock.close()


def test_registry_bind_failure_changes_nothing(registry: Registry) -> None:
    (held,), _ = registry.apply(targets("tcp://127.0.0.1:0"))
    with bind(*targets("tcp://127.0.0.1:0")) as busy:
        busy_port = busy.getsockname()[1]
        port = held.identity.address[2]
        with pytest.raises(BindError):
            registry.apply(targets(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{busy_port}"))
    assert registry.sockets == [held]
    assert held.sock.fileno() >= 0


PORT_ZERO_CASES = [
    # (held socket: spec it was bound from or None if inherited, its name, its port), target, pinned port
    (("tcp://127.0.0.1:0?name=web", "web", 4100), "tcp://127.0.0.1:0?name=web", 4100),
    # inherited (LISTEN_FDS): no spec, the name decides
    ((None, "web", 4100), "tcp://127.0.0.1:0?name=web", 4100),
    ((None, "api", 4100), "tcp://127.0.0.1:0?name=web", 0),
    # bound for an explicit port: it does not serve "any port"
    (("tcp://127.0.0.1:4100?name=web", "web", 4100), "tcp://127.0.0.1:0?name=web", 0),
    # another transport
    (("tcp://127.0.0.1:0?name=web", "web", 4100), "udp://127.0.0.1:0?name=web", 0),
]


@pytest.mark.parametrize(("held", "wanted", "port"), PORT_ZERO_CASES)
def test_the_one_port_zero_rule(held: tuple[str | None, str, int], wanted: str, port: int) -> None:
    spec_text, name, held_port = held
    ident = SocketIdentity(
        socket.AF_INET,
        socket.SOCK_STREAM,
        socket.IPPROTO_TCP,
        ("inet", "127.0.0.1", held_port),
        True,
        False,
    )
    item = HeldSocket(None, ident, name, None if spec_text is None else parse_spec(spec_text))  # type: ignore[arg-type]
    (target,) = targets(wanted)
    (pinned,) = pin_wildcard_ports([target], [item])
    assert pinned.sockaddr[1] == port
    result = plan([item], [target])
    assert [h for _, h in result.keep] == ([item] if port else [])
