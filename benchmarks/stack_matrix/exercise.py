"""Clients running while reloads go through: the measurement of one cell.

    with ClientSet(port, ["http.client", "wrk-close"], websocket=True) as clients:
        for _ in range(5):
            reloads.append(stack.reload())
            time.sleep(gap)
        stack.settle()
    clients.reports       # one ClientReport per client

Every client starts before the first reload and stops only after the last
old generation has finished draining, so each reload's whole window is
under load.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from stack_matrix.cells import Cell
from stack_matrix.httpclients import HOST, AiohttpClient, HttpClientClient, HttpxClient
from stack_matrix.launch import ReloadResult
from stack_matrix.mix import MAX_IDLE, REQUEST_TIMEOUT
from stack_matrix.outcomes import ClientReport
from stack_matrix.wrk import WrkClient
from stack_matrix.wsclient import WebSocketClient

CLIENTS = ("http.client", "httpx", "aiohttp", "websocket", "wrk-close", "wrk-keepalive")
STRICT_CLIENTS = ("http.client", "wrk-close")
"""The CI short form's clients: the one that never retries, and wrk with a
new connection per request."""
WARM_TIMEOUT = 30.0
WRK_SLOW_SHARE = 0.1


class Client(Protocol):
    name: str
    report: ClientReport

    def start(self) -> None: ...

    def warmed(self) -> bool: ...

    def stop(self, timeout: float = 30.0) -> ClientReport: ...


@dataclass(frozen=True)
class Load:
    """How hard each client pushes."""

    connections: int = 4
    """Connections (sessions) per Python client."""
    wrk_connections: int = 16
    max_idle: float = MAX_IDLE
    timeout: float = REQUEST_TIMEOUT
    seed: int = 1


def make_client(name: str, port: int, cell: Cell, load: Load) -> Client | None:
    """The named client for this cell, or None where it does not apply
    (WebSocket on a stack without WebSockets)."""
    common: dict[str, Any] = {
        "connections": load.connections,
        "seed": load.seed,
        "max_idle": load.max_idle,
        "timeout": load.timeout,
    }
    if name == "http.client":
        return HttpClientClient(port, **common)
    if name == "httpx":
        return HttpxClient(port, **common)
    if name == "aiohttp":
        return AiohttpClient(port, **common)
    if name == "websocket":
        return WebSocketClient(port, **common) if cell.websocket else None
    if name in ("wrk-close", "wrk-keepalive"):
        return WrkClient(
            port,
            close=name == "wrk-close",
            connections=load.wrk_connections,
            slow_share=0.0 if cell.blocking else WRK_SLOW_SHARE,
            timeout=load.timeout,
        )
    raise ValueError(f"unknown client {name!r}; clients: {', '.join(CLIENTS)}")


class ClientSet:
    """Start the clients, wait until each has had its first answer, stop them
    all on exit (each finishes the request it has in flight)."""

    def __init__(self, port: int, names: Iterable[str], cell: Cell, load: Load = Load()) -> None:
        self.clients = [c for name in names if (c := make_client(name, port, cell, load))]
        self.reports: list[ClientReport] = []
        self.warm_error: str | None = None

    def __enter__(self) -> ClientSet:
        for client in self.clients:
            client.start()
        deadline = time.monotonic() + WARM_TIMEOUT
        while not all(c.warmed() for c in self.clients):
            if time.monotonic() > deadline:
                cold = [c.name for c in self.clients if not c.warmed()]
                self.warm_error = f"no first answer within {WARM_TIMEOUT:g}s: {cold}"
                break
            time.sleep(0.02)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.reports = [client.stop() for client in self.clients]

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.reports) + sum(1 for r in self.reports if r.error)

    def describe(self) -> str:
        lines = [r.describe() for r in self.reports]
        if self.warm_error:
            lines.insert(0, f"warm-up: {self.warm_error}")
        return "\n".join(lines)


def probe(port: int, timeout: float = 10.0) -> dict[str, str]:
    """One ``GET /fast``: the identity headers of whoever answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/fast")
        response = conn.getresponse()
        response.read()
        return {k.lower(): v for k, v in response.getheaders() if k.lower().startswith("x-")}
    finally:
        conn.close()


def check_loop(cell: Cell, port: int) -> str | None:
    """None if the app runs on the event loop the cell says, else why not."""
    if cell.loop is None:
        return None
    found = probe(port).get("x-loop")
    if found != cell.loop:
        return f"{cell.id} should run on {cell.loop} but the app reports {found}"
    return None


@dataclass
class Reloads:
    """The reloads of one cell and when each happened."""

    results: list[ReloadResult] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results)

    def run(self, reload: Callable[[], ReloadResult], count: int, gap: float) -> None:
        """``count`` reloads, each after the previous one's outcome and a gap."""
        for _ in range(count):
            self.results.append(reload())
            time.sleep(gap)  # the load pattern: traffic between reloads, not a wait for an event

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.results]


def summarize(reports: Sequence[ClientReport]) -> dict[str, Any]:
    return {r.client: r.to_dict() for r in reports}
