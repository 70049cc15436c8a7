"""Idle keep-alive connections across reloads: how many are still usable
on the same connection, answered by the newest generation, and what moving
them costs.

    python benchmarks/idle_connections.py [--connections 10000] [--reloads 1]
        [--targets demo fastapi/uvicorn-h11 ...] [--no-baseline]

For each target (the demo app and one cell per server of the stack matrix,
``benchmarks/stack_matrix/cells.py``; ``--targets`` picks others), under
``nodrop run`` with 2 workers, with ``--handoff`` and then with
``--no-handoff``: opens N keep-alive connections, makes one request on each,
then per reload: reload (waiting until the old generation has exited), one
request on each connection without reconnecting. Prints a markdown table:
connections still answering, answered by the newest generation, the time
the old generation took to give them away and exit (the ledger's drain
duration), the connections the ledger counts as handed over, each process's
peak fd count (old worker, new worker, supervisor) and the supervisor's peak
RSS. RLIMIT_NOFILE is raised for this process and the supervisors it starts.
A server without handoff support shows what it gets (closed connections).
Loopback only; bounded by ``--deadline`` per check.
"""

from __future__ import annotations

import argparse
import re
import selectors
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from handoff_targets import (
    DEFAULT_CELLS,
    FdPeaks,
    label,
    raise_nofile,
    rss_kib,
    running,
    select_cells,
    worker_pids,
)

GENERATION = re.compile(rb"gen(?:eration)?[= ](\d+)")


def open_connections(port: int, count: int) -> tuple[list[socket.socket], str]:
    """Up to ``count`` connections; stops at the first that cannot be opened
    (a server that accepts one connection at a time fills its queue) and
    says why."""
    conns = []
    for _ in range(count):
        try:
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError as exc:
            return conns, f"connection {len(conns) + 1}: {type(exc).__name__}: {exc}"
    return conns, ""


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        return len(body) >= int(match.group(1))
    return body.endswith(b"0\r\n\r\n")  # chunked


def check(conns: list[socket.socket | None], path: str, deadline: float) -> list[bytes | None]:
    """One ``GET path`` on every open connection, all at once; each
    complete response, or None (closed, reset, no answer by ``deadline``).
    A response that says ``Connection: close`` counts, but its connection
    is then closed here (the client would reconnect next time)."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    out: list[bytes | None] = [None] * len(conns)
    buffers: dict[int, bytearray] = {}
    sel = selectors.DefaultSelector()
    for index, conn in enumerate(conns):
        if conn is None:
            continue
        try:
            conn.sendall(request)
        except OSError:
            continue
        conn.setblocking(False)
        buffers[index] = bytearray()
        sel.register(conn, selectors.EVENT_READ, index)
    while buffers and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            index = key.data
            sock = conns[index]
            assert sock is not None
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            buf = buffers[index]
            buf += chunk
            if not chunk or _complete(bytes(buf)):
                sel.unregister(sock)
                del buffers[index]
                if chunk:
                    out[index] = bytes(buf)
    sel.close()
    for index, conn in enumerate(conns):
        if conn is not None:
            conn.setblocking(True)
            answer = out[index]
            if answer is None or b"\r\nconnection: close" in answer.lower():
                conn.close()
                conns[index] = None
    return out


def generation_of(answer: bytes | None) -> int | None:
    if answer is None:
        return None
    match = GENERATION.search(answer)
    return int(match.group(1)) if match else None


def measure(cell_id: str, handoff: bool, args: argparse.Namespace, workdir: Path) -> list[str]:
    from handoff_targets import DEMO

    cell = DEMO if cell_id == "demo" else select_cells([cell_id])[0]
    path = "/" if cell is DEMO else "/fast"
    rows = []
    with running(cell, handoff, workdir / f"{cell.id.replace('/', '-')}-{int(handoff)}") as stack:
        assert stack.proc is not None
        sup = stack.proc.pid
        opened = time.monotonic()
        opened_conns, why = open_connections(stack.port, args.connections)
        conns: list[socket.socket | None] = list(opened_conns)
        opened = time.monotonic() - opened
        if why:
            print(f"# {label(cell, handoff)}: opened {len(conns)} only ({why})", flush=True)
        try:
            first = check(conns, path, time.monotonic() + args.deadline)
            alive = sum(a is not None for a in first)
            print(
                f"# {label(cell, handoff)}: {alive}/{args.connections} answered "
                f"(opened in {opened:.2f}s)",
                flush=True,
            )
            for _ in range(args.reloads):
                status = stack.status()
                old_gen = status["active_generation"]
                old = worker_pids(status, old_gen)
                with FdPeaks(sup) as peaks:
                    started = time.monotonic()
                    answer = stack.reload()
                    stack.settle()
                    took = time.monotonic() - started
                status = stack.status()
                new_gen = status["active_generation"]
                new = worker_pids(status, new_gen)
                ledgers = [e for r in status["reloads"] for e in r.get("ledger", [])]
                ledger: dict[str, Any] = next(
                    (e for e in ledgers if e["generation"] == old_gen), {}
                )
                answers = check(conns, path, time.monotonic() + args.deadline)
                alive = sum(a is not None for a in answers)
                newest = sum(1 for a in answers if generation_of(a) == new_gen)
                hwm = rss_kib(sup)
                rows.append(
                    "| "
                    + " | ".join(
                        str(x)
                        for x in (
                            label(cell, handoff),
                            "ok" if answer.ok else f"FAILED: {answer.message[:60]}",
                            f"{alive}/{args.connections}",
                            newest,
                            f"{ledger.get('drain_duration') or 0:.2f}",
                            f"{took:.2f}",
                            ledger.get("handed_over", "?"),
                            peaks.peak_of(old) or "-",
                            peaks.peak_of(new) or "-",
                            peaks.peaks.get(sup, "-"),
                            "-" if hwm is None else f"{hwm / 1024:.1f}",
                        )
                    )
                    + " |"
                )
                print(rows[-1], flush=True)
        finally:
            for conn in conns:
                if conn is not None:
                    conn.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--reloads", type=int, default=1)
    parser.add_argument(
        "--targets", nargs="+", default=["demo", *DEFAULT_CELLS],
        help="demo, and stack-matrix cells by id or prefix",
    )  # fmt: skip
    parser.add_argument("--no-baseline", action="store_true", help="skip the --no-handoff rows")
    parser.add_argument("--deadline", type=float, default=60.0, help="longest wait for answers")
    args = parser.parse_args()
    soft, hard = raise_nofile(2 * args.connections + 4096)
    print(f"# RLIMIT_NOFILE {soft}/{hard}", flush=True)
    targets = ["demo" if t == "demo" else t for t in args.targets]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nodrop-bench-") as workdir:
        for target in targets:
            cells = ["demo"] if target == "demo" else [c.id for c in select_cells([target])]
            for cell_id in cells:
                for handoff in (True, False) if not args.no_baseline else (True,):
                    try:
                        rows += measure(cell_id, handoff, args, Path(workdir))
                    except Exception as exc:  # one broken target must not hide the others
                        rows.append(f"| {cell_id} ({'handoff' if handoff else '--no-handoff'}) "
                                    f"| not run: {type(exc).__name__}: {str(exc)[:80]} |")  # fmt: skip
                        print(rows[-1], flush=True)
    print(
        f"\n{args.connections} idle keep-alive connections, {args.reloads} reload(s) "
        "(each waits until the old generation has exited); 2 workers per generation "
        "(gunicorn: 1 master with 2 workers)\n"
    )
    print(
        "| target | reload | still answering | by newest generation | old generation gone in s "
        "| reload+drain s | handed over | peak fds old worker | peak fds new worker "
        "| peak fds supervisor | supervisor peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
