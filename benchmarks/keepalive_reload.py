"""Keep-alive load across reloads: failed requests and reconnects caused by reloads.

    python benchmarks/keepalive_reload.py [--reloads 10] [--connections 16]
        [--targets demo fastapi/uvicorn-h11 ...] [--no-peers]

Drives keep-alive HTTP/1.1 load from two clients at once -- ``http.client``
(threads, one kept-alive connection each, never retrying: a request on a
connection the server closed is a failure) and ``wrk`` (keep-alive) -- while
each target is reloaded ``--reloads`` times, then reports per client the
failed requests and the reconnects (responses that said ``Connection:
close``, after which the client opens a new connection).

Targets: the demo app and one cell per server of the stack matrix
(``benchmarks/stack_matrix/cells.py``) under ``nodrop run``, with
``--handoff`` and with ``--no-handoff``; and, measured in the same run,
nginx and HAProxy as ``benchmarks/baselines/`` starts them (2 workers,
answering themselves; reloaded with ``nginx -s reload`` and SIGUSR2 to the
master). Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import http.client
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from baselines import servers
from baselines.cells import parse_wrk
from handoff_targets import DEFAULT_CELLS, DEMO, label, raise_nofile, running, select_cells

WRK_LUA = """\
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
  io.write(string.format("responses with Connection: close: %d\\n", total))
end
"""
CLOSES = re.compile(r"responses with Connection: close: (\d+)")


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    reconnects: int = 0
    note: str = ""


class HttpClientLoad:
    """``connections`` threads, each one kept-alive ``http.client`` connection
    with short random idle gaps, until :meth:`stop`."""

    def __init__(self, port: int, path: str, connections: int, seed: int = 1) -> None:
        self.port = port
        self.path = path
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True)
            for i in range(connections)
        ]

    def __enter__(self) -> HttpClientLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Tally:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self.tally

    def _count(self, field: str, detail: str = "") -> None:
        with self._lock:
            setattr(self.tally, field, getattr(self.tally, field) + 1)
            if detail and not self.tally.note:
                self.tally.note = detail

    def _run(self, rng: random.Random) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._stop.is_set():
                try:
                    conn.request("GET", self.path)
                    response = conn.getresponse()
                    response.read()
                except Exception as exc:
                    self._count("failed", f"{type(exc).__name__}: {exc}")
                    conn.close()
                else:
                    if response.status != 200:
                        self._count("failed", f"status {response.status}")
                    else:
                        self._count("ok")
                    if response.will_close:
                        self._count("reconnects")
                        conn.close()  # the next request opens a new connection
                self._stop.wait(rng.uniform(0, 0.02))
        finally:
            conn.close()


class WrkLoad:
    """``wrk`` keep-alive until :meth:`stop` (SIGINT: it prints its summary)."""

    def __init__(self, port: int, path: str, connections: int, workdir: Path) -> None:
        script = workdir / "closes.lua"
        script.write_text(WRK_LUA)
        self.argv = [
            "wrk", "-t1", f"-c{connections}", "-d3600s", "--timeout=5s", "-s", str(script),
            f"http://127.0.0.1:{port}{path}",
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> WrkLoad:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> Tally:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        try:
            parsed = parse_wrk(out)
        except ValueError:
            return Tally(note=f"wrk: {out[-200:]}")
        closes = CLOSES.search(out)
        return Tally(
            ok=parsed["requests"] - parsed["non_2xx"],
            failed=parsed["failed"],
            reconnects=int(closes.group(1)) if closes else 0,
            note=", ".join(f"{k} {v}" for k, v in parsed["errors"].items() if v),
        )


def under_load(
    port: int, path: str, reload: Callable[[], bool], args: argparse.Namespace, workdir: Path
) -> tuple[int, Tally, Tally]:
    """Both clients running while ``args.reloads`` reloads go through."""
    ok = 0
    with (
        HttpClientLoad(port, path, args.connections) as py,
        WrkLoad(port, path, args.connections, workdir) as wrk,
    ):
        time.sleep(args.gap)  # traffic before the first reload (the load's shape, not a wait)
        for _ in range(args.reloads):
            ok += reload()
            time.sleep(args.gap)
        return ok, py.stop(), wrk.stop()


def row(name: str, reloads: str, py: Tally, wrk: Tally) -> str:
    cells = [
        name, reloads, py.ok, py.failed, py.reconnects, wrk.ok, wrk.failed, wrk.reconnects,
        "; ".join(n for n in (py.note[:70], wrk.note) if n),
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def nodrop_rows(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    cells = [c for t in args.targets for c in ([DEMO] if t == "demo" else select_cells([t]))]
    for cell in cells:
        for handoff in (True, False):
            name = label(cell, handoff)
            where = workdir / f"{cell.id.replace('/', '-')}-{int(handoff)}"
            try:
                with running(cell, handoff, where, keepalive=args.keepalive) as stack:

                    def reload() -> bool:
                        result = stack.reload()
                        stack.settle()
                        return result.ok

                    path = "/" if cell is DEMO else "/fast"
                    ok, py, wrk = under_load(stack.port, path, reload, args, where)
                yield row(name, f"{ok}/{args.reloads}", py, wrk)
            except Exception as exc:  # one broken target must not hide the others
                yield f"| {name} | not run: {type(exc).__name__}: {str(exc)[:100]} |"


def peer_rows(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    for name, start in (("nginx", servers.start_nginx), ("HAProxy", servers.start_haproxy)):
        where = workdir / name
        where.mkdir()
        try:
            with start(str(where), []) as target:

                def reload() -> bool:
                    return target.reload().ok

                ok, py, wrk = under_load(target.port, "/", reload, args, where)
                notes = ", ".join(target.notes)
            yield row(f"{name} ({notes})", f"{ok}/{args.reloads}", py, wrk)
        except Exception as exc:
            yield f"| {name} | not run: {type(exc).__name__}: {str(exc)[:100]} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16, help="per client")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of load between reloads")
    parser.add_argument(
        "--targets", nargs="+", default=["demo", *DEFAULT_CELLS],
        help="demo, and stack-matrix cells by id or prefix",
    )  # fmt: skip
    parser.add_argument("--no-peers", action="store_true", help="skip nginx and HAProxy")
    parser.add_argument(
        "--keepalive",
        type=int,
        default=0,
        help="set the servers' idle keep-alive timeout (s); default: the cells' own",
    )
    args = parser.parse_args()
    raise_nofile(4096)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nodrop-bench-") as tmp:
        workdir = Path(tmp)
        for line in nodrop_rows(args, workdir):
            print(line, flush=True)
            rows.append(line)
        if not args.no_peers:
            for line in peer_rows(args, workdir):
                print(line, flush=True)
                rows.append(line)
    print(
        f"\nKeep-alive HTTP/1.1 from http.client ({args.connections} connections, never "
        f"retrying) and wrk ({args.connections} connections) at once, {args.reloads} reloads, "
        "loopback\n"
    )
    print(
        "| target | reloads ok | http.client ok | failed | reconnects | wrk ok | failed "
        "| reconnects | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
