"""Keep-alive HTTP clients that record every failure: ``http.client``,
``httpx`` and ``aiohttp``.

Each runs a few persistent connections, each asking for a random endpoint
(:mod:`stack_matrix.mix`) after a random idle gap of 0 to 2 s, until stopped. None
retries a request on its own account. What each library does by itself is
counted apart, never hidden:

* ``http.client`` does nothing by itself: the strictest client. A request on
  a connection the server had marked closing (``Connection: close`` on the
  previous response) is not sent there: the client reconnects and counts a
  reconnect. A request that meets EOF or a reset on a connection the server
  had *not* marked closing is a failure.
* ``httpx`` (httpcore) checks, before it reuses a pooled connection, whether
  the server has closed it; if so it opens a new one -- the request had not
  been sent, so this is not a retry. Counted as ``silent-reconnects``. A
  request already sent is never retried (``retries=0`` covers connecting only).
* ``aiohttp`` resends an idempotent request (GET) once when the connection
  broke under it (``ClientSession._retry_connection``, on by default). Such a
  request is counted as ``hidden-retries`` (a tracing hook sees the second
  connection) and not as a failure, since the caller saw none; a POST is
  never resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import random
import threading
import time
from types import SimpleNamespace
from typing import Any

from stack_matrix.mix import (
    DEFAULT_MIX,
    MAX_IDLE,
    REQUEST_TIMEOUT,
    Endpoint,
    Mix,
    body_failure,
    generation_of,
    judge,
    make_payload,
)
from stack_matrix.outcomes import ClientReport, Failure

HOST = "127.0.0.1"


class ThreadedClient:
    """``connections`` threads, each running :meth:`connection` until stopped."""

    name = "client"

    def __init__(
        self,
        port: int,
        *,
        connections: int = 4,
        seed: int = 0,
        mix: Mix = DEFAULT_MIX,
        max_idle: float = MAX_IDLE,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.port = port
        self.connections = connections
        self.seed = seed
        self.mix = mix
        self.max_idle = max_idle
        self.timeout = timeout
        self.report = ClientReport(self.name)
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.connections):
            rng = random.Random(f"{self.name}-{self.seed}-{index}")
            thread = threading.Thread(
                target=self._guarded, args=(index, rng), name=f"{self.name}-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def warmed(self) -> bool:
        """As many answers as connections (each starts with a /fast at once),
        or the client broke."""
        return (
            self.report.ok + self.report.failed >= self.connections or self.report.error is not None
        )

    def stop(self, timeout: float = 30.0) -> ClientReport:
        """Finish the requests in flight, close, and report."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            self.report.error = f"threads still running {timeout:g}s after stop: {stuck}"
        return self.report

    def idle(self, rng: random.Random, first: bool = False) -> bool:
        """The idle gap before the next request (none before the first, so the
        clients are all busy at once); False once stopping."""
        return not self.stopping.wait(0.0 if first else rng.uniform(0.0, self.max_idle))

    def _guarded(self, index: int, rng: random.Random) -> None:
        try:
            self.connection(index, rng)
        except Exception as exc:  # a bug in the client must show, not pass as zero failures
            self.report.error = f"connection {index} crashed: {exc!r}"
            raise

    def connection(self, index: int, rng: random.Random) -> None:
        raise NotImplementedError


# -- http.client ------------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, kind: Failure, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _send_failure(exc: BaseException) -> Failure:
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, http.client.RemoteDisconnected):
        return Failure.EOF
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return Failure.RESET
    return Failure.PROTOCOL


class HttpClientClient(ThreadedClient):
    """``http.client.HTTPConnection``, kept alive, never retrying."""

    name = "http.client"

    def connection(self, index: int, rng: random.Random) -> None:
        payload = make_payload(rng)
        conn: http.client.HTTPConnection | None = None
        asked_to_reconnect = False
        last_generation = "?"
        try:
            first = True
            while self.idle(rng, first):
                endpoint = Endpoint.FAST if first else self.mix.choose(rng)
                first = False
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                    try:
                        conn.connect()
                    except OSError as exc:
                        kind = (
                            Failure.REFUSED
                            if isinstance(exc, ConnectionRefusedError)
                            else _send_failure(exc)
                        )
                        self.report.fail(kind, endpoint.label, f"connect: {exc!r}")
                        conn.close()
                        conn = None
                        continue
                    if asked_to_reconnect:
                        self.report.reconnected()
                    asked_to_reconnect = False
                    last_generation = "?"
                try:
                    generation, will_close = self._exchange(conn, endpoint, payload)
                except _Failed as failed:
                    self.report.fail(failed.kind, endpoint.label, failed.detail, last_generation)
                    conn.close()
                    conn = None
                    self.report.count("reconnects-after-failure")
                    continue
                self.report.succeeded(generation)
                last_generation = generation
                if will_close:
                    conn.close()
                    conn = None
                    asked_to_reconnect = True
        finally:
            if conn is not None:
                conn.close()

    def _exchange(
        self, conn: http.client.HTTPConnection, endpoint: Endpoint, payload: bytes
    ) -> tuple[str, bool]:
        body = payload if endpoint is Endpoint.ECHO else None
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        try:
            conn.request(endpoint.method, endpoint.path, body=body, headers=headers)
        except OSError as exc:
            raise _Failed(_send_failure(exc), f"sending: {exc!r}") from exc
        try:
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _Failed(_send_failure(exc), f"awaiting the response: {exc!r}") from exc
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            kind = Failure.TIMEOUT if isinstance(exc, TimeoutError) else body_failure(endpoint)
            raise _Failed(kind, f"reading the body ({response.status}): {exc!r}") from exc
        verdict = judge(endpoint, response.status, data, payload)
        if verdict is not None:
            raise _Failed(*verdict)
        return generation_of(response.getheader("X-Generation"), data), response.will_close


# -- httpx ------------------------------------------------------------------------


def _httpx_failure(exc: BaseException) -> Failure:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return Failure.TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return Failure.REFUSED if "refused" in str(exc).lower() else Failure.RESET
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc):
        return Failure.EOF
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return Failure.RESET
    return Failure.PROTOCOL


class HttpxClient(ThreadedClient):
    """``httpx.Client`` (one pooled connection per thread), defaults kept."""

    name = "httpx"

    def connection(self, index: int, rng: random.Random) -> None:
        import httpx

        payload = make_payload(rng)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        last_stream: object | None = None
        closing = failed = False
        last_generation = "?"
        with httpx.Client(
            base_url=f"http://{HOST}:{self.port}", timeout=self.timeout, limits=limits
        ) as client:
            first = True
            while self.idle(rng, first):
                endpoint = Endpoint.FAST if first else self.mix.choose(rng)
                first = False
                body = payload if endpoint is Endpoint.ECHO else None
                request = client.build_request(endpoint.method, endpoint.path, content=body)
                try:
                    response = client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    self.report.fail(
                        _httpx_failure(exc), endpoint.label, repr(exc), last_generation
                    )
                    failed = True
                    continue
                try:
                    stream = response.extensions.get("network_stream")
                    if last_stream is not None and stream is not last_stream:
                        if failed:
                            self.report.count("reconnects-after-failure")
                        elif closing:
                            self.report.reconnected()
                        else:
                            self.report.count("silent-reconnects")
                    last_stream = stream
                    closing = failed = False
                    try:
                        data = response.read()
                    except httpx.HTTPError as exc:
                        kind = (
                            Failure.TIMEOUT
                            if isinstance(exc, httpx.TimeoutException)
                            else body_failure(endpoint)
                        )
                        self.report.fail(kind, endpoint.label, f"body: {exc!r}", last_generation)
                        failed = True
                        continue
                finally:
                    response.close()
                verdict = judge(endpoint, response.status_code, data, payload)
                if verdict is not None:
                    self.report.fail(verdict[0], endpoint.label, verdict[1], last_generation)
                    failed = True
                    continue
                generation = generation_of(response.headers.get("X-Generation"), data)
                self.report.succeeded(generation)
                last_generation = generation
                closing = response.headers.get("Connection", "").lower() == "close"


# -- aiohttp ------------------------------------------------------------------------


def _aiohttp_failure(exc: BaseException) -> Failure:
    import aiohttp

    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return Failure.TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Failure.REFUSED if exc.os_error.errno == errno.ECONNREFUSED else Failure.RESET
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Failure.EOF
    if isinstance(exc, aiohttp.ClientOSError):
        return Failure.RESET
    return Failure.PROTOCOL


class AiohttpClient(ThreadedClient):
    """One ``aiohttp.ClientSession`` (defaults kept) shared by ``connections``
    tasks, on an event loop in its own thread."""

    name = "aiohttp"

    def start(self) -> None:
        self._loop_ready = threading.Event()
        thread = threading.Thread(target=self._guarded_loop, name=self.name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 30.0) -> ClientReport:
        self._loop_ready.wait(timeout)
        loop, event = getattr(self, "_loop", None), getattr(self, "_stop_event", None)
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(event.set)
        return super().stop(timeout)

    def _guarded_loop(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            self.report.error = f"event loop crashed: {exc!r}"
            raise
        finally:
            self._loop_ready.set()

    async def _main(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._loop_ready.set()
        trace = aiohttp.TraceConfig()

        async def on_connection(session: Any, ctx: SimpleNamespace, params: Any) -> None:
            ctx.trace_request_ctx.connections += 1

        async def on_created(session: Any, ctx: SimpleNamespace, params: Any) -> None:
            self.report.count("connections-opened")

        trace.on_connection_create_end.append(on_connection)
        trace.on_connection_create_end.append(on_created)
        trace.on_connection_reuseconn.append(on_connection)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        async with aiohttp.ClientSession(
            f"http://{HOST}:{self.port}", timeout=timeout, trace_configs=[trace]
        ) as session:
            tasks = [
                asyncio.create_task(
                    self._connection(session, random.Random(f"{self.name}-{self.seed}-{i}"))
                )
                for i in range(self.connections)
            ]
            await asyncio.gather(*tasks)

    async def _idle(self, rng: random.Random, first: bool) -> bool:
        gap = 0.0 if first else rng.uniform(0.0, self.max_idle)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), gap)
        return not self._stop_event.is_set()

    async def _connection(self, session: Any, rng: random.Random) -> None:
        import aiohttp

        payload = make_payload(rng)
        try:
            first = True
            while await self._idle(rng, first):
                endpoint = Endpoint.FAST if first else self.mix.choose(rng)
                first = False
                ctx = SimpleNamespace(connections=0)
                data = b""
                try:
                    async with session.request(
                        endpoint.method,
                        endpoint.path,
                        data=payload if endpoint is Endpoint.ECHO else None,
                        trace_request_ctx=ctx,
                    ) as response:
                        try:
                            data = await response.read()
                        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                            kind = (
                                Failure.TIMEOUT
                                if isinstance(exc, asyncio.TimeoutError)
                                else body_failure(endpoint)
                            )
                            self.report.fail(kind, endpoint.label, f"body: {exc!r}")
                            continue
                        status = response.status
                        header_generation = response.headers.get("X-Generation")
                        if response.headers.get("Connection", "").lower() == "close":
                            self.report.reconnected()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    self.report.fail(_aiohttp_failure(exc), endpoint.label, repr(exc))
                    continue
                finally:
                    if ctx.connections > 1:
                        self.report.count("hidden-retries", ctx.connections - 1)
                verdict = judge(endpoint, status, data, payload)
                if verdict is not None:
                    self.report.fail(verdict[0], endpoint.label, verdict[1])
                    continue
                self.report.succeeded(generation_of(header_generation, data))
        except Exception as exc:
            self.report.error = f"aiohttp task crashed: {exc!r}"
            raise
