"""Idle keep-alive connections across reloads: how many are still usable
on the same connection, answered by the newest generation.

    python benchmarks/idle_connections.py [--connections 500] [--reloads 5]

Opens N keep-alive connections to the demo app under ``nodrop run`` (2
workers), makes one request on each, then per reload: reload (waiting for the
old generation to exit), then one request on each connection, without
reconnecting. Prints a markdown table, with and without the handoff.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import time

from keepalive_reload import start, stop
from nodrop.supervisor.control import request


def ask(conn: socket.socket) -> str | None:
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    return data.split(b"\r\n\r\n", 1)[1].decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nodrop-bench-") as workdir:
        for handoff in (True, False):
            proc, control, port = start(handoff, workdir)
            conns = [
                socket.create_connection(("127.0.0.1", port), timeout=10)
                for _ in range(args.connections)
            ]
            try:
                ports = [c.getsockname()[1] for c in conns]
                alive = [ask(c) is not None for c in conns]
                for number in range(2, args.reloads + 2):
                    started = time.monotonic()
                    answer = request(control, "reload", timeout=120, wait="drained")
                    took = time.monotonic() - started
                    bodies = [ask(c) if ok else None for c, ok in zip(conns, alive, strict=True)]
                    alive = [b is not None for b in bodies]
                    newest = sum(
                        1 for b in bodies if b and b.startswith(f"hello from generation {number},")
                    )
                    same_port = sum(
                        1
                        for c, p, ok in zip(conns, ports, alive, strict=True)
                        if ok and c.getsockname()[1] == p
                    )
                    rows.append(
                        (
                            "nodrop + demo app" + (" (handoff)" if handoff else " (--no-handoff)"),
                            number - 1,
                            "ok" if answer.get("ok") else "FAILED",
                            f"{took:.2f}",
                            f"{sum(alive)}/{args.connections}",
                            same_port,
                            newest,
                        )
                    )
            finally:
                for c in conns:
                    c.close()
                stop(proc, control)
    print(
        f"\n{args.connections} idle keep-alive connections, {args.reloads} reloads "
        "(each reload waits until the old generation has exited)\n"
    )
    print(
        "| server | reload | outcome | reload+drain s | still answering | same client port | answered by newest generation |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    for peer in ("nginx", "haproxy", "gunicorn"):
        if shutil.which(peer) is None:
            print(f"| {peer} | not installed | | | | | |")


if __name__ == "__main__":
    main()
