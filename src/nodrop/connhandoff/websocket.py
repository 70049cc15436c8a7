"""A minimal RFC 6455 WebSocket codec, server side (pure, plus one stream reader).

Enough for the connection handoff's long-lived sessions: the opening
handshake's accept key, and frames (client frames are masked, server frames
are not). No extensions, no fragmentation of outgoing messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct

from nodrop.errors import ProtocolError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_PAYLOAD = 1 << 20

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def handshake_key(head: bytes) -> str:
    """The ``Sec-WebSocket-Key`` of an upgrade request head.

    Raises:
        ProtocolError: not a WebSocket upgrade.
    """
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get(b"upgrade", b"").lower() != b"websocket" or b"sec-websocket-key" not in headers:
        raise ProtocolError("not a WebSocket upgrade request")
    return headers[b"sec-websocket-key"].decode("ascii", "replace")


def handshake_response(key: str) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
    )


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; ``mask`` (4 bytes) for a client's frame."""
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", n)
    if mask:
        head += mask
        payload = unmask(payload, mask)
    return bytes(head) + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


async def read_frame(
    reader: asyncio.StreamReader, *, require_mask: bool = True
) -> tuple[bool, int, bytes]:
    """Read one frame: (fin, opcode, unmasked payload).

    Raises:
        ProtocolError: unmasked client frame, or payload over MAX_PAYLOAD.
        asyncio.IncompleteReadError: EOF mid-frame.
    """
    b0, b1 = await reader.readexactly(2)
    masked, n = b1 & 0x80, b1 & 0x7F
    if require_mask and not masked:
        raise ProtocolError("client frames must be masked")
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    if n > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_PAYLOAD}")
    mask = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(n)
    return bool(b0 & 0x80), b0 & 0x0F, unmask(payload, mask) if mask else payload
