"""What the holder and upgrader test servers answer: one line in, their pid out."""

import os
import socket


def answer_one(listener: socket.socket) -> None:
    """Accept one connection if one is queued, read a line, reply with our pid."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
        if data:
            conn.sendall(f"{os.getpid()}\n".encode())
