"""The cells of the matrix: one measurement against one running server.

* :func:`loadgen_cell`: nodrop's load generator, ``close`` or ``keepalive``,
  with reloads on a schedule; failures and latency are attributed to reload
  windows.
* :func:`wrk_cell`: ``wrk`` (an independent client) for the same time with
  the same reload schedule; it only gives totals.
* :func:`idle_cell`: N idle keep-alive connections, one reload, and how many
  still answer on the same connection afterwards.

Each returns a JSON-able dict.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from baselines.servers import HOST
from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.http import ResponseParser, build_request
from nodrop.load.reload import ReloadRecord

#: Deadline of one request, for both clients (seconds).
REQUEST_TIMEOUT = 5.0
#: After the reload window of the idle scenario, wait this long before probing.
IDLE_SETTLE = 1.0

Reload = Callable[[], ReloadRecord]


def reload_summary(records: list[ReloadRecord]) -> dict[str, Any]:
    """Count, failures and window lengths of a cell's reloads."""
    durations = sorted(r.duration for r in records)
    return {
        "count": len(records),
        "failed": sum(not r.ok for r in records),
        "median_s": durations[len(durations) // 2] if durations else None,
        "max_s": durations[-1] if durations else None,
        "messages": sorted({r.message for r in records if not r.ok})[:3],
    }


class _RecordingReloader:
    """A Reloader for ``run_load`` that also keeps its records."""

    def __init__(self, reload: Reload) -> None:
        self._reload = reload
        self.records: list[ReloadRecord] = []

    def reload(self) -> ReloadRecord:
        record = self._reload()
        self.records.append(record)
        return record


def loadgen_cell(
    port: int, reload: Reload, mode: Mode, *, duration: float, reloads: int, concurrency: int
) -> dict[str, Any]:
    """nodrop's load generator with ``reloads`` evenly spread reloads."""
    config = LoadConfig(
        host=HOST,
        port=port,
        mode=mode,
        concurrency=concurrency,
        duration=duration,
        timeout=REQUEST_TIMEOUT,
        reload_every=duration / (reloads + 1),
        reloads=reloads,
    )
    reloader = _RecordingReloader(reload)
    result = run_load(config, reloader)
    steady, in_reload = result.steady.p99, result.reload.p99
    failures = {k: v for k, v in result.outcomes.items() if k != "ok" and v}
    return {
        "client": "loadgen",
        "mode": mode.value,
        "requests": result.attempts,
        "failed": result.failed,
        "failed_per_million": result.failed_per_million,
        "failures": failures,
        "failures_in_reload": {
            k: v for k, v in result.outcomes_in_reload.items() if k != "ok" and v
        },
        "p99_steady_s": steady,
        "p99_reload_s": in_reload,
        "p99_ratio": in_reload / steady if steady and in_reload else None,
        "reconnects": result.reconnects,
        "reconnects_in_reload": result.reconnects_in_reload,
        "reconnect_causes": dict(result.reconnect_causes),
        "rate": result.achieved_rate,
        "generator_cpu": result.generator_cpu,
        "processes": result.processes,
        "reloads": reload_summary(reloader.records),
        "raw": result.to_dict(),
    }


# --- wrk ------------------------------------------------------------------------

_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_P99 = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> dict[str, Any]:
    """Totals from wrk's text output (pure).

    Returns:
        ``requests`` (completed responses), ``errors`` (socket errors by
        kind), ``non_2xx``, ``failed`` (socket errors + non-2xx), ``p99_s``
        (with ``--latency``) and ``elapsed_s``.

    Raises:
        ValueError: the text has no "N requests in T" line.
    """
    m = _REQUESTS.search(text)
    if m is None:
        raise ValueError("no 'requests in' line in wrk output")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * _UNITS.get(m.group(3), 1.0)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if e := _SOCKET_ERRORS.search(text):
        errors = dict(zip(errors, map(int, e.groups()), strict=True))
    non_2xx = int(n.group(1)) if (n := _NON_2XX.search(text)) else 0
    p99 = _P99.search(text)
    return {
        "requests": requests,
        "errors": errors,
        "non_2xx": non_2xx,
        "failed": sum(errors.values()) + non_2xx,
        "p99_s": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else None,
        "elapsed_s": elapsed,
    }


def _reload_on_schedule(
    reload: Reload, start: float, every: float, count: int, stop_at: float, out: list[ReloadRecord]
) -> None:
    for i in range(count):
        at = start + every * (i + 1)
        if at >= stop_at:
            return
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule itself
        out.append(reload())


def wrk_cell(
    wrk: str,
    port: int,
    reload: Reload,
    mode: Mode,
    *,
    duration: float,
    reloads: int,
    concurrency: int,
) -> dict[str, Any]:
    """wrk for ``duration`` seconds while a thread reloads on the same schedule."""
    threads = max(1, min(2, concurrency))
    argv = [
        wrk, f"-t{threads}", f"-c{concurrency}", f"-d{duration:g}s",
        f"--timeout={REQUEST_TIMEOUT:g}s", "--latency",
    ]  # fmt: skip
    if mode is Mode.CLOSE:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    records: list[ReloadRecord] = []
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reloader = threading.Thread(
        target=_reload_on_schedule,
        args=(reload, start, duration / (reloads + 1), reloads, start + duration, records),
    )
    reloader.start()
    try:
        out, _ = proc.communicate(timeout=duration + REQUEST_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    reloader.join(timeout=120)
    cell: dict[str, Any] = {"client": "wrk", "mode": mode.value, "argv": argv}
    try:
        cell |= parse_wrk(out)
    except ValueError as exc:
        cell |= {"error": f"{exc}: {out[-500:]}"}
        return cell
    total = cell["requests"] + sum(cell["errors"].values())
    cell["failed_per_million"] = 1e6 * cell["failed"] / total if total else 0.0
    cell["rate"] = cell["requests"] / cell["elapsed_s"] if cell["elapsed_s"] else 0.0
    cell["reloads"] = reload_summary(records)
    return cell


# --- idle keep-alive connections ---------------------------------------------------


def _request(sock: socket.socket, host: str, port: int, timeout: float) -> str | None:
    """One keep-alive GET on ``sock``: the body's first line on a complete 2xx
    response (its ``, pid N`` part dropped), else None."""
    parser = ResponseParser()
    received = bytearray()
    sock.settimeout(timeout)
    try:
        sock.sendall(build_request(host, port, "/", keep_alive=True))
        while not parser.complete:
            data = sock.recv(65536)
            if not data:
                return None
            received += data
            parser.feed(data)
    except Exception:
        return None
    if parser.status is None or not 200 <= parser.status < 300:
        return None
    body = bytes(received).partition(b"\r\n\r\n")[2].decode(errors="replace")
    return body.strip().splitlines()[0].split(", pid")[0] if body.strip() else ""


def idle_cell(port: int, reload: Reload, *, connections: int) -> dict[str, Any]:
    """Open ``connections`` keep-alive connections (one request each), reload once,
    then send one more request on each: does it answer on the same connection?

    While the reload runs (in a thread) every connection is watched for the
    server's FIN or RST, to tell when the server closed it.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            s = socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT)
            socks.append(s)
            if _request(s, HOST, port, REQUEST_TIMEOUT) is None:
                return {"error": f"connection {len(socks)} got no answer before the reload"}
        ports = [s.getsockname()[1] for s in socks]
        records: list[ReloadRecord] = []
        started = time.monotonic()
        worker = threading.Thread(target=lambda: records.append(reload()))
        worker.start()
        closed_at: dict[int, float] = {}
        with selectors.DefaultSelector() as sel:
            for i, s in enumerate(socks):
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
            settle_until: float | None = None
            while settle_until is None or time.monotonic() < settle_until:
                if settle_until is None and not worker.is_alive():
                    settle_until = time.monotonic() + IDLE_SETTLE
                for key, _ in sel.select(0.05):
                    try:
                        peek = key.fileobj.recv(1, socket.MSG_PEEK)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        peek = b""
                    # FIN, RST, or bytes nobody asked for (a 408...): not reusable.
                    del peek
                    closed_at[key.data] = time.monotonic() - started
                    sel.unregister(key.fileobj)
        worker.join()
        survived = 0
        answered_by: Counter[str] = Counter()
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            body = _request(s, HOST, port, REQUEST_TIMEOUT)
            if body is not None and s.getsockname()[1] == ports[i]:  # same connection
                survived += 1
                answered_by[body] += 1
        times = sorted(closed_at.values())
        return {
            "connections": connections,
            "survived": survived,
            "closed_by_server": len(closed_at),
            "first_close_s": times[0] if times else None,
            "last_close_s": times[-1] if times else None,
            "answered_by": dict(answered_by.most_common(5)),
            "reloads": reload_summary(records),
        }
    except OSError as exc:
        return {"error": f"after {len(socks)} connections: {exc}"}
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
