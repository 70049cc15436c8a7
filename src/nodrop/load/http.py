"""Minimal, correct HTTP/1.1 requests and an incremental response parser.

Pure code: the parser is fed bytes and says when a response is complete. It
handles exactly what a load generator needs: the status line, headers, and a
body framed by ``Content-Length``, ``Transfer-Encoding: chunked`` (trailers
included) or the end of the connection; 1xx interim responses are skipped,
and 204/304 have no body. Anything else is malformed and raises
:class:`~nodrop.errors.ProtocolError`.
"""

from __future__ import annotations

import enum

from nodrop.errors import ProtocolError

#: Largest header block accepted before the response is called malformed.
MAX_HEAD_BYTES = 64 * 1024


def build_request(host: str, port: int, path: str, *, keep_alive: bool) -> bytes:
    """Return the bytes of one ``GET`` request.

    Args:
        host: the ``Host`` header's host part (IPv6 literals are bracketed).
        port: the ``Host`` header's port.
        path: the request target, starting with ``/``.
        keep_alive: ``False`` adds ``Connection: close``.

    Raises:
        ValueError: the path does not start with ``/`` or contains whitespace.
    """
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ValueError(f"bad request path {path!r}")
    host_part = f"[{host}]" if ":" in host else host
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_part}:{port}\r\n"
        f"User-Agent: nodrop-load\r\nConnection: {connection}\r\n\r\n"
    ).encode("ascii")


class _State(enum.Enum):
    HEAD = "head"
    FIXED = "fixed"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    TRAILERS = "trailers"
    UNTIL_EOF = "until-eof"
    DONE = "done"


class ResponseParser:
    """Parse one HTTP/1.x response from bytes fed as they arrive.

    Attributes:
        status: the final status code once the head is parsed, else ``None``.
        keep_alive: whether the connection may carry another request after
            this response (HTTP/1.1 without ``Connection: close``, or 1.0
            with ``Connection: keep-alive``; never when the body runs to EOF).
        complete: whether the whole response has been received.
    """

    def __init__(self) -> None:
        self.status: int | None = None
        self.keep_alive = False
        self.complete = False
        self._state = _State.HEAD
        self._buf = bytearray()
        self._remaining = 0

    def feed(self, data: bytes) -> bool:
        """Consume bytes; return ``True`` once the response is complete.

        Bytes after the end of the response are kept but ignored (a load
        generator never pipelines).

        Raises:
            ProtocolError: the bytes are not a valid HTTP/1.x response.
        """
        self._buf += data
        while self._step():
            pass
        return self.complete

    def feed_eof(self) -> bool:
        """Tell the parser the peer closed; return whether the response is complete."""
        if self._state is _State.UNTIL_EOF:
            self._state = _State.DONE
            self.complete = True
        return self.complete

    def _step(self) -> bool:
        """Advance one state if the buffer allows; return whether it did."""
        state = self._state
        if state is _State.HEAD:
            return self._parse_head()
        if state is _State.FIXED:
            take = min(self._remaining, len(self._buf))
            del self._buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._finish()
                return False
            return False
        if state is _State.CHUNK_SIZE:
            return self._parse_chunk_size()
        if state is _State.CHUNK_DATA:
            # Chunk data plus its trailing CRLF.
            if len(self._buf) < self._remaining + 2:
                return False
            if self._buf[self._remaining : self._remaining + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del self._buf[: self._remaining + 2]
            self._state = _State.CHUNK_SIZE
            return True
        if state is _State.TRAILERS:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            del self._buf[: end + 2]
            if end == 0:
                self._finish()
                return False
            return True
        if state is _State.UNTIL_EOF:
            self._buf.clear()
        return False

    def _finish(self) -> None:
        self._state = _State.DONE
        self.complete = True

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError("response head too large")
            # Reject garbage early rather than waiting for a deadline.
            if len(self._buf) >= 5 and not self._buf.startswith(b"HTTP/"):
                raise ProtocolError("response does not start with HTTP/")
            return False
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        lines = head.split("\r\n")
        version, status = _parse_status_line(lines[0])
        headers = _parse_headers(lines[1:])
        if 100 <= status < 200:
            return True  # interim response (100 Continue): the real one follows
        self.status = status
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        self._frame_body(status, headers)
        return self._state is not _State.DONE

    def _frame_body(self, status: int, headers: dict[str, str]) -> None:
        if status in (204, 304):
            self._finish()
            return
        encoding = headers.get("transfer-encoding")
        if encoding is not None:
            if encoding.strip().lower().split(",")[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {encoding!r}")
            self._state = _State.CHUNK_SIZE
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise ProtocolError(f"bad Content-Length {length!r}")
            self._remaining = int(length)
            if self._remaining == 0:
                self._finish()
            else:
                self._state = _State.FIXED
            return
        self._state = _State.UNTIL_EOF
        self.keep_alive = False

    def _parse_chunk_size(self) -> bool:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError("chunk size line too long")
            return False
        line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
        del self._buf[: end + 2]
        try:
            size = int(line, 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size {line!r}") from exc
        if size < 0:
            raise ProtocolError(f"bad chunk size {line!r}")
        if size == 0:
            self._state = _State.TRAILERS
        else:
            self._remaining = size
            self._state = _State.CHUNK_DATA
        return True


def _parse_status_line(line: str) -> tuple[str, int]:
    parts = line.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(f"bad status line {line!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"bad status code in {line!r}")
    return parts[0], int(code)


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line!r}")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise ProtocolError("conflicting Content-Length headers")
            headers[key] = f"{headers[key]}, {value}" if key != "content-length" else value
        else:
            headers[key] = value
    return headers
