"""Fuzz targets: every wire parser, fed bytes a hostile peer could send.

Each target takes raw bytes and either returns or raises the one exception
its parser documents (``ProtocolError`` or ``ControlError``); anything else
-- a ``KeyError``, a ``TypeError``, a ``RecursionError``, a result that breaks
the parser's own promise -- is a bug. The same targets run under hypothesis
(tests/test_fuzz.py) and under atheris, coverage-guided
(benchmarks/fuzz.py, corpus in benchmarks/fuzz_corpus/).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

from nodrop.connhandoff.wire import MAX_ROOM, Verdict, decode_states, parse_room
from nodrop.errors import ControlError, ProtocolError
from nodrop.fdwire import MAX_TRANSFER, decode, parse_fds_chunk
from nodrop.holder import ops
from nodrop.kernel.fdpass import MAX_FDS_PER_MESSAGE
from nodrop.supervisor.control import COMMANDS, parse_request
from nodrop.systemd.message import MAX_MESSAGE, parse_message

Target = Callable[[bytes], None]


def control_request(data: bytes) -> None:
    """A line on the control socket (``supervisor/control.py``)."""
    try:
        request = parse_request(data)
    except ControlError:
        return
    assert isinstance(request, dict)
    assert request["cmd"] in COMMANDS
    assert request.get("wait", "ready") in ("ready", "drained")


def _split(data: bytes) -> tuple[int, int, bytes]:
    """Two small numbers from the first bytes, and the rest."""
    if len(data) < 2:
        return 0, 0, data
    return data[0] % (MAX_FDS_PER_MESSAGE + 2), data[1], data[2:]


def fdwire_manifest(data: bytes) -> None:
    """An ``fds`` message of a socket transfer (``fdwire.py``), with a number
    of fds and of sockets already received taken from the first bytes."""
    nfds, received, rest = _split(data)
    try:
        header = decode(rest)
        total, entries, meta = parse_fds_chunk(header, nfds, received, MAX_TRANSFER)
    except ProtocolError:
        return
    assert len(entries) == nfds
    assert received + nfds <= total <= MAX_TRANSFER
    assert (meta is None) == (received != 0) or isinstance(meta, dict)


def notify_datagram(data: bytes) -> None:
    """A datagram on a notify socket (``systemd/message.py``), then what the
    holder's fd store makes of it (``holder/ops.py``)."""
    try:
        fields = parse_message(data)
    except ProtocolError:
        return
    assert len(data) <= MAX_MESSAGE
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    try:
        asked = ops.parse_fdstore(fields)
    except ProtocolError:
        return
    if isinstance(asked, ops.FdStore) and asked.ttl is not None:
        assert math.isfinite(asked.ttl)
        assert asked.ttl > 0


def holder_op(data: bytes) -> None:
    """A request to ``nodrop hold`` (``holder/ops.py`` over ``fdwire.decode``)."""
    try:
        request = ops.parse_request(decode(data))
    except ProtocolError:
        return
    if isinstance(request, ops.Deposit) and request.ttl is not None:
        assert math.isfinite(request.ttl)
        assert 0 < request.ttl <= ops.DEFAULT_TTL_MAX


def connhandoff_message(data: bytes) -> None:
    """A connection-handoff message (``connhandoff/wire.py``): a verdict for a
    batch, a receiver's room, the states of a batch."""
    batch, _, rest = _split(data)
    try:
        header = decode(rest)
    except ProtocolError:
        return
    try:
        verdict = Verdict.from_header(header, batch)
    except ProtocolError:
        pass
    else:
        assert verdict.placed + verdict.closed + len(verdict.returned) == batch
        assert all(0 <= i < batch for i in verdict.returned)
    with contextlib.suppress(ProtocolError):
        assert 0 <= parse_room(header) <= MAX_ROOM
    meta = header.get("meta")
    if isinstance(meta, dict):
        with contextlib.suppress(ProtocolError):
            assert len(decode_states(meta, batch)) == batch


TARGETS: dict[str, Target] = {
    "control_request": control_request,
    "fdwire_manifest": fdwire_manifest,
    "notify_datagram": notify_datagram,
    "holder_op": holder_op,
    "connhandoff_message": connhandoff_message,
}
