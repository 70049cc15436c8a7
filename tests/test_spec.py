"""Listener spec parsing: table-driven, no I/O."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodrop.errors import SpecError
from nodrop.listeners.spec import (
    DEFAULT_BACKLOG,
    ListenerOptions,
    ListenerSpec,
    Transport,
    format_spec,
    parse_spec,
)

TCP, UDP, UNIX = Transport.TCP, Transport.UDP, Transport.UNIX

VALID = [
    ("tcp://127.0.0.1:8000", ListenerSpec(TCP, host="127.0.0.1", port=8000)),
    ("tcp://[::1]:8000", ListenerSpec(TCP, host="::1", port=8000)),
    ("tcp://0.0.0.0:80", ListenerSpec(TCP, host="0.0.0.0", port=80)),
    ("tcp://[::]:0", ListenerSpec(TCP, host="::", port=0)),
    ("tcp://localhost:8000", ListenerSpec(TCP, host="localhost", port=8000)),
    ("tcp://[fe80::1%eth0]:8000", ListenerSpec(TCP, host="fe80::1%eth0", port=8000)),
    ("127.0.0.1:9000", ListenerSpec(TCP, host="127.0.0.1", port=9000)),
    ("udp://127.0.0.1:53", ListenerSpec(UDP, host="127.0.0.1", port=53)),
    ("udp://[::1]:65535", ListenerSpec(UDP, host="::1", port=65535)),
    ("unix:/run/app.sock", ListenerSpec(UNIX, path="/run/app.sock")),
    ("unix:///run/app.sock", ListenerSpec(UNIX, path="/run/app.sock")),
    ("unix:relative.sock", ListenerSpec(UNIX, path="relative.sock")),  # no cwd: as written
    ("unix:@abstract-name", ListenerSpec(UNIX, abstract="abstract-name")),
    (
        "tcp://127.0.0.1:8000?name=web&backlog=4096&reuseport=1&fastopen=256&defer_accept=1",
        ListenerSpec(
            TCP,
            host="127.0.0.1",
            port=8000,
            options=ListenerOptions(
                name="web", backlog=4096, reuseport=True, fastopen=256, defer_accept=1
            ),
        ),
    ),
    (
        "tcp://[::]:80?v6only=1&reuseport=0",
        ListenerSpec(TCP, host="::", port=80, options=ListenerOptions(v6only=True)),
    ),
    (
        "tcp://[::]:80?v6only",
        ListenerSpec(TCP, host="::", port=80, options=ListenerOptions(v6only=True)),
    ),
    (
        "unix:/run/app.sock?mode=0660&owner=www-data&group=33&name=api",
        ListenerSpec(
            UNIX,
            path="/run/app.sock",
            options=ListenerOptions(name="api", mode=0o660, owner="www-data", group="33"),
        ),
    ),
    (
        "udp://0.0.0.0:5353?reuseport=true&name=mdns",
        ListenerSpec(
            UDP, host="0.0.0.0", port=5353, options=ListenerOptions(name="mdns", reuseport=True)
        ),
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[t for t, _ in VALID])
def test_valid_specs(text: str, expected: ListenerSpec) -> None:
    parsed = parse_spec(text)
    assert parsed == ListenerSpec(
        expected.transport,
        expected.host,
        expected.port,
        expected.path,
        expected.abstract,
        expected.options,
        text,
    )
    assert str(parsed) == text


# (spec, the offending part the error must name, a word of the reason)
INVALID = [
    ("", "", "empty"),
    (" tcp://127.0.0.1:80", " tcp://127.0.0.1:80", "white space"),
    ("http://127.0.0.1:80", "http://", "unknown scheme"),
    ("tcp://", "tcp://", "missing"),
    ("tcp://127.0.0.1", "127.0.0.1", "missing ':PORT'"),
    ("tcp://127.0.0.1:", "127.0.0.1:", "missing port"),
    ("tcp://127.0.0.1:http", "http", "port must be a number"),
    ("tcp://127.0.0.1:65536", "65536", "0 to 65535"),
    ("tcp://127.0.0.1:-1", "-1", "port must be a number"),
    ("tcp://:8000", ":8000", "missing host"),
    ("tcp://::1:8000", "::1", "brackets"),
    ("tcp://[::1:8000", "[::1:8000", "unclosed"),
    ("tcp://[127.0.0.1]:80", "[127.0.0.1]", "IPv6"),
    ("tcp://[::1]8000", "[::1]8000", "':PORT'"),
    ("tcp://exa mple:80", "exa mple", "host name"),
    ("tcp://-bad.example:80", "-bad.example", "host name"),
    ("tcp://127.0.0.1:80?colour=red", "colour=red", "unknown option"),
    ("tcp://127.0.0.1:80?backlog=lots", "backlog=lots", "whole number"),
    ("tcp://127.0.0.1:80?backlog=0", "backlog=0", "between"),
    ("tcp://127.0.0.1:80?reuseport=maybe", "reuseport=maybe", "1 or 0"),
    ("tcp://127.0.0.1:80?name=a:b", "name=a:b", "without ':'"),
    ("tcp://127.0.0.1:80?name=", "name=", "name"),
    ("tcp://127.0.0.1:80?name=a&name=b", "name=b", "twice"),
    ("tcp://127.0.0.1:80?name=a&&backlog=1", "?name=a&&backlog=1", "stray '&'"),
    ("tcp://127.0.0.1:80?mode=0660", "mode=0660", "does not apply to tcp"),
    ("tcp://127.0.0.1:80?v6only=1", "v6only", "IPv6"),
    ("udp://127.0.0.1:53?fastopen=5", "fastopen=5", "does not apply to udp"),
    ("udp://127.0.0.1:53?backlog=5", "backlog=5", "does not apply to udp"),
    ("unix:", "unix:", "missing socket path"),
    ("unix:@", "@", "empty abstract"),
    ("unix:/run/x.sock?mode=999", "mode=999", "octal"),
    ("unix:/run/x.sock?mode=77777", "mode=77777", "out of range"),
    ("unix:/run/x.sock?reuseport=1", "reuseport=1", "does not apply to unix"),
    ("unix:/run/x.sock?owner=a:b", "owner=a:b", "user or group"),
    ("unix:@name?mode=0600", "mode=0600", "abstract"),
    ("unix:/" + "x" * 107, "/" + "x" * 107, "longer than 107"),
    ("unix://", "unix://", "missing socket path"),
]


@pytest.mark.parametrize(("text", "part", "reason"), INVALID, ids=[i[0][:40] for i in INVALID])
def test_invalid_specs_name_the_offending_part(text: str, part: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.part == part
    assert reason in info.value.reason
    assert repr(part) in str(info.value)


def test_default_backlog_and_name() -> None:
    spec = parse_spec("tcp://127.0.0.1:1")
    assert spec.options.backlog == DEFAULT_BACKLOG
    assert spec.name is None
    assert spec.host_is_literal
    assert not parse_spec("tcp://localhost:1").host_is_literal


def test_not_a_string() -> None:
    with pytest.raises(TypeError):
        parse_spec(8000)  # type: ignore[arg-type]


@given(
    port=st.integers(0, 65535),
    backlog=st.integers(1, 100000),
    reuseport=st.booleans(),
    name=st.text(
        st.characters(min_codepoint=32, max_codepoint=126, exclude_characters=":&?="),
        min_size=1,
        max_size=20,
    ),
    v6=st.booleans(),
)
def test_format_round_trips(port: int, backlog: int, reuseport: bool, name: str, v6: bool) -> None:
    host = "[::1]" if v6 else "10.1.2.3"
    spec = parse_spec(
        f"tcp://{host}:{port}?name={name}&backlog={backlog}&reuseport={int(reuseport)}"
    )
    again = parse_spec(format_spec(spec))
    assert again.options == spec.options
    assert (again.host, again.port) == (spec.host, spec.port)


@given(st.text(max_size=60))
def test_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(SpecError):
        parse_spec(text)


def test_relative_unix_path_is_made_absolute_against_the_given_cwd() -> None:
    """J: the command line resolves `unix:relative.sock` at parse time."""
    assert parse_spec("unix:run/app.sock", "/srv/x").path == "/srv/x/run/app.sock"
    assert parse_spec("unix:../app.sock", "/srv/x").path == "/srv/app.sock"
    assert parse_spec("unix:/abs.sock", "/srv/x").path == "/abs.sock"
    assert parse_spec("unix:@name", "/srv/x").abstract == "name"
    with pytest.raises(SpecError, match="longer than"):
        parse_spec("unix:a.sock", "/" + "d" * 120)
