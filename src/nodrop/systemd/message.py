"""The sd_notify message format (pure, no I/O).

A message is newline-separated ``KEY=VALUE`` assignments, UTF-8, as in
sd_notify(3): ``READY=1\\nSTATUS=serving``. Keys are upper-case ASCII letters,
digits and ``_``. A value cannot contain a newline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from nodrop.errors import NotifyError, ProtocolError

MAX_MESSAGE = 4096
"""Largest message accepted, as systemd's NOTIFY_BUFFER_MAX (PIPE_BUF)."""

_KEY = re.compile(r"[A-Z0-9_]+")


def format_message(fields: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """Encode assignments; raises NotifyError for a key or value that can't be sent."""
    items = fields.items() if isinstance(fields, Mapping) else fields
    lines = []
    for key, value in items:
        if not _KEY.fullmatch(key):
            raise NotifyError(f"invalid notify key {key!r}")
        if "\n" in value or "\0" in value:
            raise NotifyError(f"notify value for {key} contains a newline or NUL")
        lines.append(f"{key}={value}")
    data = "\n".join(lines).encode()
    if len(data) > MAX_MESSAGE:
        raise NotifyError(f"notify message is {len(data)} bytes; the limit is {MAX_MESSAGE}")
    return data


def parse_message(data: bytes) -> dict[str, str]:
    """Decode a message into its assignments (the last one of a key wins).

    Raises:
        ProtocolError: not UTF-8, a line without ``=``, a bad key, too long.
    """
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"notify message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("notify message is not UTF-8") from exc
    if "\0" in text:
        raise ProtocolError("notify message contains a NUL byte")
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue  # systemd tolerates empty lines and a trailing newline
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ProtocolError(f"notify line {line[:60]!r} is not KEY=VALUE")
        fields[key] = value
    return fields
