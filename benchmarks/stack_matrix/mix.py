"""What the HTTP clients ask and how an answer is judged (pure: no I/O).

Every client mixes the same four requests on persistent connections, with a
random idle gap before each: ``GET /fast``, ``GET /slow`` (0.5 s),
``GET /stream`` (20 events over 2 s) and ``POST /echo`` with a 1 MB body.
"""

from __future__ import annotations

import enum
import os
import random
import re
from dataclasses import dataclass

from stack_matrix.outcomes import Failure

STREAM_EVENTS = 20
"""Events ``/stream`` sends (``stackapp.STREAM_CHUNKS``; tests check they agree)."""
ECHO_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 10.0
"""Seconds a client waits on one socket operation. Steady state answers the
slowest request (the 2 s stream) in well under this on a loaded 2-core machine."""
MAX_IDLE = 2.0
"""Longest idle gap between two requests on a connection: below every
server's keep-alive timeout in the matrix (5 s or more), so steady state
never closes a connection a client is about to use."""


class Endpoint(enum.Enum):
    FAST = "fast"
    SLOW = "slow"
    STREAM = "stream"
    ECHO = "echo"

    @property
    def method(self) -> str:
        return "POST" if self is Endpoint.ECHO else "GET"

    @property
    def path(self) -> str:
        return "/" + self.value

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class Mix:
    """How often each endpoint is asked for (weights)."""

    fast: float = 4.0
    slow: float = 2.5
    stream: float = 1.5
    echo: float = 2.0

    def choose(self, rng: random.Random) -> Endpoint:
        weights = [self.fast, self.slow, self.stream, self.echo]
        return rng.choices(list(Endpoint), weights=weights)[0]


DEFAULT_MIX = Mix()


def make_payload(rng: random.Random) -> bytes:
    """1 MB that a truncation or a mix-up between requests cannot go unseen in."""
    head = rng.getrandbits(64).to_bytes(8, "big") + os.urandom(8)
    return (head + rng.randbytes(ECHO_BYTES - len(head)))[:ECHO_BYTES]


_IDENTITY = re.compile(rb"gen=(\S+) pid=(\d+)")
_EVENT = re.compile(rb"data: (\d+) gen=\S+ pid=\d+")


def generation_of(headers_generation: str | None, body: bytes) -> str:
    """The generation that answered: the header, else the body's ``gen=``."""
    if headers_generation:
        return headers_generation
    m = _IDENTITY.search(body[:200])
    return m.group(1).decode() if m else "?"


def judge(
    endpoint: Endpoint, status: int, body: bytes, payload: bytes
) -> tuple[Failure, str] | None:
    """None if the answer is what steady state gives, else why not (pure)."""
    if status >= 500:
        return Failure.HTTP_5XX, f"{status}: {body[:120]!r}"
    if not 200 <= status < 300:
        return Failure.BAD_STATUS, f"{status}: {body[:120]!r}"
    if endpoint is Endpoint.ECHO:
        if body != payload:
            same = next(
                (i for i, (a, b) in enumerate(zip(body, payload, strict=False)) if a != b),
                min(len(body), len(payload)),
            )
            return Failure.ECHO_BAD, f"{len(body)} of {len(payload)} bytes, equal up to {same}"
        return None
    if endpoint is Endpoint.STREAM:
        events = [int(m.group(1)) for m in _EVENT.finditer(body)]
        if events != list(range(STREAM_EVENTS)):
            return Failure.STREAM_TRUNCATED, f"events {events[:3]}..{events[-2:]} ({len(events)})"
        return None
    if not body.startswith(endpoint.value.encode()) or _IDENTITY.search(body) is None:
        return Failure.PROTOCOL, f"unexpected body {body[:120]!r}"
    return None


def body_failure(endpoint: Endpoint) -> Failure:
    """The class of a response that started but whose body did not arrive whole."""
    if endpoint is Endpoint.STREAM:
        return Failure.STREAM_TRUNCATED
    if endpoint is Endpoint.ECHO:
        return Failure.ECHO_BAD
    return Failure.EOF
