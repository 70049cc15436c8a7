"""Strict clients for the reload tests of the hypercorn and aiohttp adapters.

None of them retries. A request fails when it meets a reset, an EOF before
its response, a timeout, a status other than 200, or a short or wrong body.
A connection the server closed *after* saying ``Connection: close`` is a
reconnect, not a failure; a kept-alive connection that ends without that
header is a failure on the request that finds it closed.

* :class:`HttpClients` -- ``http.client`` persistent connections cycling
  through /fast, /slow, /stream and a 1 MB POST /echo, with idle gaps;
* :class:`WebSocketClients` -- ``websockets`` sessions sending a message
  every 0.1-0.3 s; a session cut by a reload must be closed with 1012;
* :func:`start_wrk` -- ``wrk`` keep-alive or ``Connection: close``, cycling
  through the same four requests, /fast five times in eight (a Lua script).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ECHO_BYTES = 1 << 20
STREAM_BODY = b"".join(b"chunk %02d\n" % n for n in range(20))
KINDS = ("fast", "slow", "stream", "echo")


@dataclass
class Tally:
    """What the clients saw; ``failures`` holds one line per failed request."""

    ok: int = 0
    reconnects: int = 0
    closed_1012: int = 0
    failures: list[str] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def success(self, kind: str) -> None:
        with self.lock:
            self.ok += 1
            self.by_kind[kind] += 1

    def fail(self, line: str) -> None:
        with self.lock:
            self.failures.append(line)

    def summary(self) -> str:
        return (
            f"ok={self.ok} failed={len(self.failures)} reconnects={self.reconnects} "
            f"ws_closed_1012={self.closed_1012} by_kind={dict(self.by_kind)}"
        )


class HttpClients:
    """``http.client`` keep-alive clients, one thread and connection each."""

    def __init__(
        self,
        port: int,
        clients: int = 8,
        *,
        max_gap: float = 0.5,
        kinds: tuple[str, ...] = KINDS,
        timeout: float = 10.0,
    ) -> None:
        self.port = port
        self.max_gap = max_gap
        self.kinds = kinds
        self.timeout = timeout
        self.tally = Tally()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]
        self.ports: dict[int, set[int]] = {}

    def __enter__(self) -> HttpClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _request(self, conn: http.client.HTTPConnection, kind: str) -> None:
        if kind == "echo":
            body = random.randbytes(ECHO_BYTES)
            conn.request("POST", "/echo", body=body)
        else:
            body = b""
            conn.request("GET", f"/{kind}")
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise AssertionError(f"status {response.status}: {data[:200]!r}")
        if kind == "echo" and data != body:
            raise AssertionError(f"echo: {len(data)} bytes back of {len(body)}")
        if kind == "stream" and data != STREAM_BODY:
            raise AssertionError(f"stream: {len(data)} bytes of {len(STREAM_BODY)}")
        if kind in ("fast", "slow") and not data.startswith(b"version="):
            raise AssertionError(f"{kind}: {data[:100]!r}")

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        ports = self.ports.setdefault(index, set())
        number = index
        try:
            while not self.stop.is_set():
                kind = self.kinds[number % len(self.kinds)]
                number += 1
                fresh = conn.sock is None
                if fresh:
                    conn.connect()
                    ports.add(conn.sock.getsockname()[1])
                    if number > index + 1:
                        with self.tally.lock:
                            self.tally.reconnects += 1
                try:
                    self._request(conn, kind)
                except Exception as exc:
                    self.tally.fail(
                        f"http.client {kind} on a {'new' if fresh else 'kept-alive'} "
                        f"connection: {type(exc).__name__}: {exc}"
                    )
                    conn.close()
                else:
                    self.tally.success(kind)
                self.stop.wait(rng.uniform(0, self.max_gap))
        finally:
            conn.close()


class WebSocketClients:
    """``websockets`` echo sessions; a session may only end with code 1012."""

    def __init__(self, port: int, sessions: int = 4, *, path: str = "/ws") -> None:
        self.url = f"ws://127.0.0.1:{port}{path}"
        self.tally = Tally()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(sessions)
        ]

    def __enter__(self) -> WebSocketClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self, index: int) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        rng = random.Random(index)
        number = 0
        while not self.stop.is_set():
            try:
                with connect(self.url, open_timeout=10, close_timeout=5) as ws:
                    number = self._session(ws, index, number, rng)
            except ConnectionClosed:
                pass  # counted by _session
            except Exception as exc:
                self.tally.fail(f"websocket connect: {type(exc).__name__}: {exc}")
                self.stop.wait(0.2)

    def _session(self, ws: Any, index: int, number: int, rng: random.Random) -> int:
        from websockets.exceptions import ConnectionClosed

        while not self.stop.is_set():
            message = f"{index}:{number}"
            number += 1
            try:
                ws.send(message)
                answer = ws.recv(timeout=10)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code == 1012:
                    with self.tally.lock:
                        self.tally.closed_1012 += 1
                        self.tally.reconnects += 1
                else:
                    self.tally.fail(f"websocket closed with {code}: {exc}")
                return number
            except Exception as exc:
                self.tally.fail(f"websocket: {type(exc).__name__}: {exc}")
                return number
            if answer != message:
                self.tally.fail(f"websocket echo {answer!r} for {message!r}")
                return number
            self.tally.success("ws")
            self.stop.wait(rng.uniform(0.1, 0.3))
        return number


class IdleConnections:
    """Many kept-alive connections that sit idle between checks.

    Each :meth:`check` sends one ``GET /fast`` on every connection, as is
    (never reconnecting), and says which generations answered.
    """

    def __init__(self, port: int, count: int, timeout: float = 10.0) -> None:
        self.port = port
        self.conns = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=timeout) for _ in range(count)
        ]
        self.ports: list[int] = []

    def __enter__(self) -> IdleConnections:
        for conn in self.conns:
            conn.connect()
            self.ports.append(conn.sock.getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self.conns:
            conn.close()

    def check(self) -> tuple[int, list[str], Counter[str]]:
        """(answered on the same connection, failures, answers per generation)."""
        ok, failures, generations = 0, [], Counter[str]()
        for index, conn in enumerate(self.conns):
            if conn.sock is None:
                failures.append(f"connection {index} was closed by the server")
                continue
            port = conn.sock.getsockname()[1]
            try:
                conn.request("GET", "/fast")
                response = conn.getresponse()
                body = response.read().decode()
            except Exception as exc:
                failures.append(f"connection {index}: {type(exc).__name__}: {exc}")
                conn.close()
                continue
            if response.status != 200 or port != self.ports[index]:
                failures.append(f"connection {index}: status {response.status}, port {port}")
                continue
            if response.will_close:
                failures.append(f"connection {index}: answered with Connection: close")
            ok += 1
            match = re.search(r"gen=(\S+)", body)
            generations[match.group(1) if match else "?"] += 1
        return ok, failures, generations


# -- wrk ------------------------------------------------------------------------

WRK_SCRIPT = """
closes = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  local value = headers["Connection"] or headers["connection"] or ""
  if string.lower(value) == "close" then closes = closes + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("closes") end
  io.write(string.format("responses with Connection: close: %%d\\n", total))
end
local big = string.rep("x", %(echo)d)
local n = 0
request = function()
  n = n + 1
  local k = n %% 8
  if k == 5 then return wrk.format("GET", "/slow") end
  if k == 6 then return wrk.format("GET", "/stream") end
  if k == 7 then
    return wrk.format("POST", "/echo", {["Content-Type"] = "application/octet-stream"}, big)
  end
  return wrk.format("GET", "/fast")
end
"""

_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_REQUESTS = re.compile(r"(\d+) requests in ")
_CLOSES = re.compile(r"responses with Connection: close: (\d+)")


@dataclass(frozen=True)
class WrkReport:
    requests: int
    errors: tuple[int, int, int, int] = (0, 0, 0, 0)
    non_2xx: int = 0
    text: str = ""
    closes: int = 0
    """Responses that said ``Connection: close`` (each costs wrk a reconnect)."""

    @property
    def failed(self) -> int:
        return sum(self.errors) + self.non_2xx


def parse_wrk(text: str) -> WrkReport:
    requests = _REQUESTS.search(text)
    if requests is None:
        raise ValueError(f"not a wrk report:\n{text}")
    errors = _SOCKET_ERRORS.search(text)
    non_2xx = _NON_2XX.search(text)
    closes = _CLOSES.search(text)
    counts = tuple(int(n) for n in errors.groups()) if errors else (0, 0, 0, 0)
    return WrkReport(
        int(requests.group(1)),
        counts,  # type: ignore[arg-type]
        int(non_2xx.group(1)) if non_2xx else 0,
        text,
        int(closes.group(1)) if closes else 0,
    )


def start_wrk(
    port: int, seconds: float, workdir: Path, *, keepalive: bool, connections: int = 16
) -> subprocess.Popen[str]:
    script = workdir / "wrk-mix.lua"
    script.write_text(WRK_SCRIPT % {"echo": ECHO_BYTES})
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
        "-s", str(script),
    ]  # fmt: skip
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish_wrk(proc: subprocess.Popen[str], timeout: float = 60) -> WrkReport:
    out, _ = proc.communicate(timeout=timeout)
    return parse_wrk(out)


_SUMMARY = re.compile(r"connections: accepted (\d+), adopted (\d+), handed over (\d+)")


def connection_summary(log: str) -> tuple[int, int, int]:
    """(accepted, adopted, handed over), summed over every worker's last log line."""
    totals = [0, 0, 0]
    for match in _SUMMARY.finditer(log):
        for index in range(3):
            totals[index] += int(match.group(index + 1))
    return totals[0], totals[1], totals[2]


def wait_until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


# -- one run: every client at once, reloads in between ----------------------------


@dataclass
class RunReport:
    reloads: list[dict[str, object]]
    http: Tally
    ws: Tally | None
    wrk_keepalive: WrkReport | None
    wrk_close: WrkReport | None

    @property
    def failed(self) -> int:
        total = len(self.http.failures)
        total += len(self.ws.failures) if self.ws else 0
        total += self.wrk_keepalive.failed if self.wrk_keepalive else 0
        total += self.wrk_close.failed if self.wrk_close else 0
        return total

    def describe(self) -> str:
        lines = [
            f"reloads ok: {sum(1 for r in self.reloads if r.get('ok'))}/{len(self.reloads)}",
            f"http.client: {self.http.summary()}",
        ]
        lines += [f"  {line}" for line in self.http.failures[:20]]
        if self.ws is not None:
            lines.append(f"websockets: {self.ws.summary()}")
            lines += [f"  {line}" for line in self.ws.failures[:20]]
        for name, report in (("keep-alive", self.wrk_keepalive), ("close", self.wrk_close)):
            if report is not None:
                lines.append(
                    f"wrk {name}: {report.requests} requests, errors "
                    f"(connect, read, write, timeout) {report.errors}, non-2xx {report.non_2xx}, "
                    f"Connection: close {report.closes}"
                )
        return "\n".join(lines)


def reload_under_load(
    reload: object,
    port: int,
    reloads: int,
    workdir: Path,
    *,
    http_clients: int = 8,
    ws_sessions: int = 4,
    wrk_connections: int = 8,
    wrk: bool = True,
    wrk_close: bool = True,
    max_gap: float = 0.5,
    settle: float = 1.0,
) -> RunReport:
    """Every client at once while ``reloads`` reloads go through, one after another."""
    import signal

    procs: dict[str, subprocess.Popen[str]] = {}
    budget = 30 + reloads * 10
    if wrk:
        for name, keepalive in (("keepalive", True), ("close", False))[: 2 if wrk_close else 1]:
            procs[name] = start_wrk(
                port, budget, workdir, keepalive=keepalive, connections=wrk_connections
            )
    ws_clients = WebSocketClients(port, ws_sessions) if ws_sessions else None
    outcomes: list[dict[str, object]] = []
    try:
        with (
            HttpClients(port, http_clients, max_gap=max_gap) as http_load,
            ws_clients or contextlib.nullcontext(),
        ):
            time.sleep(settle)  # load established before the first reload
            for _ in range(reloads):
                outcomes.append(reload())  # type: ignore[operator]
                time.sleep(0.3)
            time.sleep(settle)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
    reports = {name: finish_wrk(proc) for name, proc in procs.items()}
    return RunReport(
        outcomes,
        http_load.tally,
        ws_clients.tally if ws_clients else None,
        reports.get("keepalive"),
        reports.get("close"),
    )


# -- by hand: python stack_clients.py [--reloads N] [--workers N] -- CMD ... ----------


def main(argv: list[str] | None = None) -> int:
    """Run CMD under ``nodrop run`` (a temporary control socket), every client
    at once, N reloads; print what the clients saw. Exit 0 if nothing failed."""
    import argparse
    import os
    import sys
    import tempfile

    from nodrop.supervisor.control import request

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ws", action="store_true", help="no WebSocket sessions")
    parser.add_argument("--run-arg", action="append", default=[], help="extra `nodrop run` option")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control.sock")
        log = open(os.path.join(tmp, "log"), "wb")  # noqa: SIM115
        argv_run = [
            sys.executable, "-m", "nodrop", "run", "--control", control,
            "--listen", "tcp://127.0.0.1:0", "--workers", str(args.workers),
            "--ready-timeout", "20", "--ready-grace", "0.2", *args.run_arg, "--", *command,
        ]  # fmt: skip
        sup = subprocess.Popen(argv_run, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: os.path.exists(control), 20)
            status: dict[str, object] = {}

            def active() -> bool:
                nonlocal status
                with contextlib.suppress(Exception):
                    status = request(control, "status", timeout=5)
                return bool(status.get("active_generation"))

            wait_until(active, 30)
            listeners = status["listeners"]
            port = int(listeners[0]["address"].rsplit(":", 1)[1])  # type: ignore[index]
            report = reload_under_load(
                lambda: request(control, "reload", timeout=60),
                port,
                args.reloads,
                Path(tmp),
                ws_sessions=0 if args.no_ws else 4,
            )
            print(report.describe())
            handoff = request(control, "status", timeout=5).get("handoff")
            if handoff:
                print(f"handoff: {handoff}")
            return 0 if report.failed == 0 else 1
        finally:
            with contextlib.suppress(Exception):
                request(control, "stop", timeout=60)
            sup.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    raise SystemExit(main())
