"""The holder's requests, parsed and checked (pure: no syscalls).

Every request is one handoff-protocol message (``{"v": 1, "op": ...}``, see
``docs/protocol.md``); :func:`parse_request` turns its decoded header into one
of the request types below or raises :class:`~nodrop.errors.ProtocolError`
with a message that goes back to the peer verbatim. The systemd fd-store
datagrams (``FDSTORE=1``, ``FDSTOREREMOVE=1``) are parsed by
:func:`parse_fdstore`.

Wire summary (``docs/holder.md`` has the details)::

    {"op":"deposit","ttl":S}            then one transfer (fds messages); reply ok
    {"op":"claim", SELECTOR}            reply: one transfer; the claimant acks ok
    {"op":"list"}                       reply ok + "sockets": [...]
    {"op":"release", SELECTOR}          reply ok + "released": n

    SELECTOR: "all": true | "names": [..] | "ids": [..] | "match": [KEY, ..]
    KEY: [family, type, protocol, kind, *address]   (a SocketIdentity key)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodrop.errors import ProtocolError
from nodrop.listeners.identity import Address, SocketIdentity
from nodrop.listeners.spec import fdname_is_valid

Key = tuple[int, int, int, Address]

DEFAULT_TTL = 30.0
"""Seconds a deposit is held when the depositor names no time-to-live."""
DEFAULT_TTL_MAX = 3600.0
"""The longest time-to-live the holder grants unless started with another."""
DEFAULT_MAX_HELD = 4096
"""Most sockets one holder keeps at once."""
MAX_SELECTORS = 4096
"""Most names, ids or keys one request may list."""
FDSTORE_DEFAULT_NAME = "stored"
"""The name systemd gives an ``FDSTORE=1`` fd that comes without ``FDNAME=``."""


@dataclass(frozen=True)
class Selector:
    """Which held sockets a claim or release is about.

    A socket is selected if any given criterion matches it: its name is in
    ``names``, its holder-assigned id is in ``ids``, or its kernel identity
    key is in ``keys``. ``everything`` selects all.
    """

    everything: bool = False
    names: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()
    keys: frozenset[Key] = frozenset()

    def selects(self, item_id: int, name: str, identity: SocketIdentity) -> bool:
        return (
            self.everything
            or name in self.names
            or item_id in self.ids
            or identity.key in self.keys
        )


@dataclass(frozen=True)
class Deposit:
    """Park the sockets of the transfer that follows for ``ttl`` seconds
    (``None``: the holder's default)."""

    ttl: float | None


@dataclass(frozen=True)
class Claim:
    selector: Selector


@dataclass(frozen=True)
class ListParked:
    pass


@dataclass(frozen=True)
class Release:
    selector: Selector


Request = Deposit | Claim | ListParked | Release


@dataclass(frozen=True)
class FdStore:
    """``FDSTORE=1``: park the datagram's fds under ``name``."""

    name: str
    ttl: float | None


@dataclass(frozen=True)
class FdStoreRemove:
    """``FDSTOREREMOVE=1``: close every held socket called ``name``."""

    name: str


def key_to_wire(key: Key) -> list[Any]:
    """``[family, type, protocol, kind, *address]`` (pure)."""
    family, type_, proto, address = key
    return [family, type_, proto, *address]


def parse_key(value: object) -> Key:
    """Inverse of :func:`key_to_wire`.

    Raises:
        ProtocolError: malformed.
    """
    if type(value) is not list or len(value) < 4:
        raise ProtocolError("a match key is [family, type, protocol, kind, ...address]")
    # Reuse the identity parser: a key is an identity without the flags.
    try:
        identity = SocketIdentity.from_wire([*value[:3], 0, *value[3:]])
    except ValueError as exc:
        raise ProtocolError(f"bad match key: {exc}") from exc
    return identity.key


def parse_ttl(value: object, ttl_max: float) -> float | None:
    """A time-to-live in seconds: a positive finite number, at most ``ttl_max``.

    Raises:
        ProtocolError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"ttl {value!r} is not a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ProtocolError(f"ttl {value!r} must be a positive number of seconds")
    if value > ttl_max:
        raise ProtocolError(f"ttl {value} exceeds this holder's maximum of {ttl_max:g} s")
    return float(value)


def _string_list(header: Mapping[str, Any], field: str) -> list[Any]:
    value = header.get(field, [])
    if type(value) is not list:
        raise ProtocolError(f"{field!r} must be a list")
    if len(value) > MAX_SELECTORS:
        raise ProtocolError(f"{field!r} lists {len(value)} items; the limit is {MAX_SELECTORS}")
    return value


def parse_selector(header: Mapping[str, Any]) -> Selector:
    """The selector fields of a claim or release.

    Raises:
        ProtocolError: malformed, or no selector at all (to take or close
            everything, a peer must say ``"all": true``).
    """
    everything = header.get("all", False)
    if type(everything) is not bool:
        raise ProtocolError("'all' must be true or false")
    names = _string_list(header, "names")
    if not all(type(n) is str and fdname_is_valid(n) for n in names):
        raise ProtocolError("'names' must be valid fd names (1-255 printable chars, no ':')")
    ids = _string_list(header, "ids")
    if not all(type(i) is int and i >= 0 for i in ids):
        raise ProtocolError("'ids' must be non-negative integers")
    keys = frozenset(parse_key(k) for k in _string_list(header, "match"))
    if not (everything or names or ids or keys):
        raise ProtocolError("say which sockets: 'all': true, 'names', 'ids' or 'match'")
    return Selector(everything, frozenset(names), frozenset(ids), keys)


def parse_request(header: Mapping[str, Any], *, ttl_max: float = DEFAULT_TTL_MAX) -> Request:
    """Turn a decoded request into a :data:`Request`.

    Args:
        header: the output of :func:`nodrop.fdwire.decode` (envelope checked).
        ttl_max: the longest ttl this holder grants.

    Raises:
        ProtocolError: unknown op or malformed fields.
    """
    op = header.get("op")
    if op == "deposit":
        return Deposit(parse_ttl(header.get("ttl"), ttl_max))
    if op == "claim":
        return Claim(parse_selector(header))
    if op == "list":
        return ListParked()
    if op == "release":
        return Release(parse_selector(header))
    raise ProtocolError(f"unknown op {op!r}; expected deposit, claim, list or release")


def check_names(names: Iterable[str]) -> None:
    """Deposited names must be names systemd accepts in ``LISTEN_FDNAMES``.

    Raises:
        ProtocolError: naming the first bad one.
    """
    for name in names:
        if not fdname_is_valid(name):
            raise ProtocolError(f"socket name {name!r} is not a valid fd name")


def parse_fdstore(
    fields: Mapping[str, str], *, ttl_max: float = DEFAULT_TTL_MAX
) -> FdStore | FdStoreRemove | None:
    """What a notify datagram asks of the fd store; None if nothing.

    ``FDSTORETTL=`` (seconds) is a nodrop extension; systemd ignores unknown
    variables, so a program may send it to both.

    Raises:
        ProtocolError: a bad ``FDNAME=`` or ``FDSTORETTL=``, or
            ``FDSTOREREMOVE=1`` without a name.
    """
    name = fields.get("FDNAME")
    if name is not None and not fdname_is_valid(name):
        raise ProtocolError(f"FDNAME={name!r} is not a valid fd name")
    if fields.get("FDSTOREREMOVE") == "1":
        if name is None:
            raise ProtocolError("FDSTOREREMOVE=1 needs FDNAME=")
        return FdStoreRemove(name)
    if fields.get("FDSTORE") != "1":
        return None
    ttl: float | None = None
    raw = fields.get("FDSTORETTL")
    if raw is not None:
        try:
            number = float(raw)
        except ValueError as exc:
            raise ProtocolError(f"FDSTORETTL={raw!r} is not a number") from exc
        ttl = parse_ttl(number, ttl_max)
    return FdStore(name or FDSTORE_DEFAULT_NAME, ttl)


def check_holder_path(path: str, *, allow_abstract: bool) -> None:
    """A holder path must be absolute, or ``@name`` when abstract names are allowed.

    Abstract Unix names have no file permissions: any process in the network
    namespace can connect, so only ``SO_PEERCRED`` stands between it and the
    sockets. That is a choice to make explicitly.

    Raises:
        ProtocolError: relative, empty, or abstract without permission.
    """
    if path.startswith("@"):
        if not allow_abstract:
            raise ProtocolError(
                f"{path}: abstract socket names have no file permissions; "
                "pass --allow-abstract to use one anyway"
            )
        if len(path) < 2 or len(path) > 107:
            raise ProtocolError(f"{path}: abstract name must be 1-107 bytes")
        return
    if not path.startswith("/"):
        raise ProtocolError(f"{path!r}: the holder path must be absolute")
    if len(path.encode()) > 107:
        raise ProtocolError(f"{path}: longer than a Unix socket path may be (107 bytes)")
