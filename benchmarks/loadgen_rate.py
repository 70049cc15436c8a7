"""How fast is nodrop's load generator? Prints a markdown table.

Starts a trivial HTTP server (epoll, canned 200 response, in its own
processes sharing one listening socket on 127.0.0.1) and runs
:func:`nodrop.load.run_load` against it in close and keepalive modes with
1 and N worker processes; if ``wrk`` is installed it is run against the same
server for comparison (keepalive only; wrk has no close mode). On a small
machine the server and the generator share the cores, so the figures are a
floor for the generator, not a ceiling.

    python benchmarks/loadgen_rate.py [--duration 5] [--server-processes 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

from nodrop.load import LoadConfig, Mode, run_load

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
RESPONSE_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\n\r\nok"
)


def serve(fd: int) -> None:
    """The trivial server loop on an inherited listening socket (runs until killed)."""
    lsock = socket.socket(fileno=fd)
    lsock.setblocking(False)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:
        for fileno, _ in ep.poll():
            if fileno == lsock.fileno():
                for _ in range(64):
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conns[conn.fileno()] = (conn, bytearray())
                    ep.register(conn.fileno(), select.EPOLLIN)
                continue
            conn, buf = conns[fileno]
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                ep.unregister(fileno)
                del conns[fileno]
                conn.close()
                continue
            buf += data
            close = False
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                close = b"close" in buf[:end].lower()
                del buf[: end + 4]
                try:
                    conn.send(RESPONSE_CLOSE if close else RESPONSE)
                except OSError:
                    close = True
                if close:
                    break
            if close:
                ep.unregister(fileno)
                del conns[fileno]
                conn.close()


@contextlib.contextmanager
def trivial_server(processes: int) -> Iterator[int]:
    """Start the trivial server; yield its port; kill its processes by pid."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    port = lsock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve-fd", str(lsock.fileno())],
            pass_fds=[lsock.fileno()],
        )
        for _ in range(processes)
    ]
    try:
        yield port
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)
        lsock.close()


def run_wrk(port: int, duration: float, connections: int, threads: int) -> float | None:
    """wrk's requests/s against the same server, or None if wrk is missing."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{int(duration)}s",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server-processes", type=int, default=1)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(args.serve_fd)
        return 0
    cores = len(os.sched_getaffinity(0))
    print(
        f"{cores} cores; trivial server: {args.server_processes} process(es); "
        f"{args.duration:.0f}s per run; concurrency {args.concurrency}\n"
    )
    print("| client | mode | client processes | requests/s | failed | p50 | p99 | client CPU |")
    print("|---|---|---|---|---|---|---|---|")
    with trivial_server(args.server_processes) as port:
        for mode in (Mode.CLOSE, Mode.KEEPALIVE):
            for procs in sorted({1, cores}):
                result = run_load(
                    LoadConfig(
                        host="127.0.0.1",
                        port=port,
                        mode=mode,
                        concurrency=args.concurrency,
                        duration=args.duration,
                        processes=procs,
                        max_requests=50_000_000,
                    )
                )
                p50 = result.overall.p50 or 0.0
                p99 = result.overall.p99 or 0.0
                print(
                    f"| nodrop.load | {mode.value} | {procs} | {result.achieved_rate:,.0f} | "
                    f"{result.failed} | {p50 * 1e3:.2f}ms | {p99 * 1e3:.2f}ms | "
                    f"{100 * result.generator_cpu:.0f}% |",
                    flush=True,
                )
        rate = run_wrk(port, args.duration, args.concurrency, cores)
        if rate is not None:
            print(f"| wrk | keepalive | {cores} threads | {rate:,.0f} | - | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
