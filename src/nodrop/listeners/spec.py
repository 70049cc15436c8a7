"""Listener specs: the strings users write to say what to listen on.

Pure parsing, no I/O. Host names are kept as written and resolved only when
the listener is bound (see :mod:`nodrop.listeners.bind`).

Grammar::

    tcp://HOST:PORT[?OPTIONS]      HOST is 127.0.0.1, [::1], 0.0.0.0, [::], a name
    udp://HOST:PORT[?OPTIONS]
    HOST:PORT[?OPTIONS]            shorthand for tcp://
    unix:/absolute/or/relative/path[?OPTIONS]
    unix:@abstract-name[?OPTIONS]  Linux abstract namespace

    OPTIONS = KEY=VALUE ('&' KEY=VALUE)*    a bare KEY means KEY=1

Options (each checked against the transport it applies to):

    name=web            fd name passed on in LISTEN_FDNAMES (default "unknown"
                        for the server; nodrop uses the spec's text nowhere)
    backlog=4096        listen(2) backlog (the kernel caps it at net.core.somaxconn)
    reuseport=1         SO_REUSEPORT
    v6only=1            IPV6_V6ONLY (IPv6 addresses only)
    fastopen=256        TCP_FASTOPEN queue length (tcp only)
    defer_accept=1      TCP_DEFER_ACCEPT seconds (tcp only)
    mode=0660           file mode of the socket path (unix paths only)
    owner=www, group=www   owner and group of the socket path (unix paths only)
"""

from __future__ import annotations

import enum
import ipaddress
import os
from dataclasses import dataclass, field

from nodrop.errors import SpecError

DEFAULT_BACKLOG = 4096
"""Backlog when the spec gives none. The kernel caps it at net.core.somaxconn."""

MAX_UNIX_PATH = 107
"""sun_path holds 108 bytes; a filesystem path needs its trailing NUL."""

MAX_FDNAME = 255
"""systemd's limit on an fd name (sd-daemon's fdname_is_valid)."""


class Transport(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    UNIX = "unix"


@dataclass(frozen=True)
class ListenerOptions:
    """Socket options a spec asks for. ``None`` means "leave the kernel default"."""

    name: str | None = None
    backlog: int = DEFAULT_BACKLOG
    reuseport: bool = False
    v6only: bool | None = None
    fastopen: int | None = None
    defer_accept: int | None = None
    mode: int | None = None
    owner: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class ListenerSpec:
    """One parsed listener spec.

    For tcp/udp, ``host`` and ``port`` are set; ``host`` is an IP literal or a
    name still to be resolved. For unix, exactly one of ``path`` and
    ``abstract`` is set.
    """

    transport: Transport
    host: str | None = None
    port: int | None = None
    path: str | None = None
    abstract: str | None = None
    options: ListenerOptions = field(default_factory=ListenerOptions)
    text: str = ""

    @property
    def name(self) -> str | None:
        return self.options.name

    @property
    def host_is_literal(self) -> bool:
        """True when ``host`` is an IP address that needs no resolution."""
        return self.host is not None and _ip_literal(self.host) is not None

    def __str__(self) -> str:
        return self.text or format_spec(self)


# Options: key -> (parser, transports it applies to, extra check)
_BOOL = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}


def _parse_bool(spec: str, key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise SpecError(spec, f"{key}={value}", "expected 1 or 0") from None


def _parse_int(spec: str, key: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise SpecError(spec, f"{key}={value}", "expected a whole number") from None
    if not lo <= number <= hi:
        raise SpecError(spec, f"{key}={value}", f"must be between {lo} and {hi}")
    return number


def _parse_mode(spec: str, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise SpecError(spec, f"mode={value}", "expected an octal file mode like 0660") from None
    if not 0 <= mode <= 0o7777:
        raise SpecError(spec, f"mode={value}", "file mode out of range (0 to 07777)")
    return mode


def fdname_is_valid(name: str) -> bool:
    """systemd's rule for fd names: printable ASCII, no ':', 1 to 255 chars."""
    if not 0 < len(name) <= MAX_FDNAME:
        return False
    return all(" " <= ch <= "~" and ch != ":" for ch in name)


_TCP_ONLY = frozenset({Transport.TCP})
_INET = frozenset({Transport.TCP, Transport.UDP})
_ALL = frozenset(Transport)
_OPTION_SCOPE: dict[str, frozenset[Transport]] = {
    "name": _ALL,
    "backlog": frozenset({Transport.TCP, Transport.UNIX}),
    "reuseport": _INET,
    "v6only": _INET,
    "fastopen": _TCP_ONLY,
    "defer_accept": _TCP_ONLY,
    "mode": frozenset({Transport.UNIX}),
    "owner": frozenset({Transport.UNIX}),
    "group": frozenset({Transport.UNIX}),
}


def _parse_options(spec: str, query: str, transport: Transport) -> dict[str, object]:
    values: dict[str, object] = {}
    if not query:
        return values
    for item in query.split("&"):
        if not item:
            raise SpecError(spec, "?" + query, "empty option (stray '&')")
        key, sep, value = item.partition("=")
        if not sep:
            value = "1"
        if key not in _OPTION_SCOPE:
            known = ", ".join(sorted(_OPTION_SCOPE))
            raise SpecError(spec, item, f"unknown option {key!r} (known: {known})")
        if transport not in _OPTION_SCOPE[key]:
            raise SpecError(spec, item, f"option {key!r} does not apply to {transport.value}")
        if key in values:
            raise SpecError(spec, item, f"option {key!r} given twice")
        if key == "name":
            if not fdname_is_valid(value):
                raise SpecError(
                    spec, item, "a name is 1-255 printable ASCII characters without ':'"
                )
            values[key] = value
        elif key in ("reuseport", "v6only"):
            values[key] = _parse_bool(spec, key, value)
        elif key == "backlog":
            values[key] = _parse_int(spec, key, value, 1, 2**31 - 1)
        elif key in ("fastopen", "defer_accept"):
            values[key] = _parse_int(spec, key, value, 0, 2**31 - 1)
        elif key == "mode":
            values[key] = _parse_mode(spec, value)
        else:  # owner, group
            if not value or any(ch in value for ch in ":/ \t"):
                raise SpecError(spec, item, "expected a user or group name or number")
            values[key] = value
    return values


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _valid_hostname(host: str) -> bool:
    if len(host) > 253 or host.endswith("-"):
        return False
    labels = host.rstrip(".").split(".")
    for label in labels:
        if not 0 < len(label) <= 63:
            return False
        if label.startswith("-") or not all(ch.isalnum() or ch in "-_" for ch in label):
            return False
        if not label.isascii():
            return False
    return True


def _parse_inet(spec: str, rest: str, transport: Transport) -> tuple[str, int]:
    if not rest:
        raise SpecError(spec, spec, "missing HOST:PORT")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise SpecError(spec, rest, "unclosed '[' in IPv6 address")
        host = rest[1:end]
        after = rest[end + 1 :]
        addr = _ip_literal(host)
        if not isinstance(addr, ipaddress.IPv6Address):
            raise SpecError(spec, f"[{host}]", "brackets hold an IPv6 address")
        if not after.startswith(":"):
            raise SpecError(spec, rest, "expected ':PORT' after ']'")
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise SpecError(spec, rest, "missing ':PORT'")
        if ":" in host:
            raise SpecError(spec, host, "an IPv6 address must be written in brackets: [::1]:8000")
        if not host:
            raise SpecError(spec, rest, "missing host (use 0.0.0.0 or [::] for all addresses)")
        if _ip_literal(host) is None and not _valid_hostname(host):
            raise SpecError(spec, host, "not an IP address or a valid host name")
    if not port_text:
        raise SpecError(spec, rest, "missing port")
    if not port_text.isdigit() or not port_text.isascii():
        raise SpecError(spec, port_text, "port must be a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise SpecError(spec, port_text, "port must be a number from 0 to 65535")
    return host, port


def parse_spec(text: str, cwd: str | None = None) -> ListenerSpec:
    """Parse one listener spec.

    Args:
        text: e.g. ``"tcp://127.0.0.1:8000?name=web&backlog=1024"``.
        cwd: resolve a relative ``unix:`` path against this directory, so
            that what is bound (and removed at exit, and shown by ``status``)
            is one absolute path; the command line passes its working
            directory. Without it the path stays as written.

    Returns:
        The parsed spec; host names are not resolved.

    Raises:
        SpecError: naming the offending part of ``text``.
    """
    if not isinstance(text, str):
        raise TypeError(f"a listener spec is a str, not {type(text).__name__}")
    if text != text.strip() or not text:
        raise SpecError(text, text, "empty, or surrounded by white space")
    body, _, query = text.partition("?")
    if body.startswith("unix:"):
        transport = Transport.UNIX
        rest = body[len("unix:") :]
        if rest.startswith("//"):
            rest = rest[2:]  # unix:///run/x.sock
    elif "://" in body:
        scheme, _, rest = body.partition("://")
        try:
            transport = Transport(scheme)
        except ValueError:
            raise SpecError(text, scheme + "://", "unknown scheme (tcp, udp or unix)") from None
        if transport is Transport.UNIX:  # "unix://" already handled above
            raise SpecError(text, scheme + "://", "write unix:/path or unix:@name")
        if rest.startswith("/"):
            raise SpecError(text, body, f"one slash too many: {scheme}://HOST:PORT")
    else:
        scheme = body.partition(":")[0].partition("/")[0]
        if scheme in ("tcp", "udp"):  # a typo'd scheme: tcp:/..., tcp:..., tcp//...
            raise SpecError(text, body, f"a scheme is written {scheme}://HOST:PORT")
        transport = Transport.TCP
        rest = body
    options = ListenerOptions(**_parse_options(text, query, transport))  # type: ignore[arg-type]

    if transport is Transport.UNIX:
        if not rest:
            raise SpecError(text, body, "missing socket path")
        if "\0" in rest:
            raise SpecError(text, rest, "NUL byte in path")
        if rest.startswith("@"):
            name = rest[1:]
            if not name:
                raise SpecError(text, rest, "empty abstract socket name")
            if len(os.fsencode(name)) > MAX_UNIX_PATH:
                raise SpecError(text, rest, f"abstract name longer than {MAX_UNIX_PATH} bytes")
            if options.mode is not None or options.owner or options.group:
                raise SpecError(text, query, "abstract sockets have no file mode or owner")
            return ListenerSpec(transport, abstract=name, options=options, text=text)
        path = rest if cwd is None else os.path.normpath(os.path.join(cwd, rest))
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise SpecError(text, rest, f"socket path {path} longer than {MAX_UNIX_PATH} bytes")
        return ListenerSpec(transport, path=path, options=options, text=text)

    host, port = _parse_inet(text, rest, transport)
    addr = _ip_literal(host)
    if options.v6only is not None and isinstance(addr, ipaddress.IPv4Address):
        raise SpecError(text, "v6only", "v6only applies to IPv6 addresses only")
    return ListenerSpec(transport, host=host, port=port, options=options, text=text)


def format_spec(spec: ListenerSpec) -> str:
    """The canonical text of a spec (options in a fixed order, defaults left out)."""
    if spec.transport is Transport.UNIX:
        base = f"unix:@{spec.abstract}" if spec.abstract is not None else f"unix:{spec.path}"
    else:
        assert spec.host is not None
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        base = f"{spec.transport.value}://{host}:{spec.port}"
    opts = spec.options
    parts: list[str] = []
    if opts.name is not None:
        parts.append(f"name={opts.name}")
    if opts.backlog != DEFAULT_BACKLOG:
        parts.append(f"backlog={opts.backlog}")
    if opts.reuseport:
        parts.append("reuseport=1")
    if opts.v6only is not None:
        parts.append(f"v6only={int(opts.v6only)}")
    if opts.fastopen is not None:
        parts.append(f"fastopen={opts.fastopen}")
    if opts.defer_accept is not None:
        parts.append(f"defer_accept={opts.defer_accept}")
    if opts.mode is not None:
        parts.append(f"mode={opts.mode:04o}")
    if opts.owner is not None:
        parts.append(f"owner={opts.owner}")
    if opts.group is not None:
        parts.append(f"group={opts.group}")
    return base + ("?" + "&".join(parts) if parts else "")
