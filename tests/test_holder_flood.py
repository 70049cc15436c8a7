"""`nodrop hold` against connections that never speak (issue 13, item D)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from conftest import Procs
from nodrop.holder import client
from nodrop.holder.config import DEFAULT_FIRST_MESSAGE_TIMEOUT, DEFAULT_MAX_PEERS
from test_holder import inode, listener, start_holder


def test_silent_connections_neither_stay_nor_lock_out_list_and_claim(
    procs: Procs, tmp_path: Path
) -> None:
    """D: 64+ connections that never sent a byte were never dropped, and every
    legitimate list/claim got "holder busy" while they stayed."""
    holder = start_holder(procs, tmp_path)
    web = listener()
    client.deposit(holder.path, {"web": web}, ttl=60)
    silent: list[socket.socket] = []
    try:
        for _ in range(DEFAULT_MAX_PEERS * 3):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            silent.append(conn)
            conn.connect(holder.path)
        # A successor, behind the whole flood, lists and claims its socket.
        assert [h.inode for h in client.list_parked(holder.path)] == [inode(web)]
        claimed = client.claim(holder.path, names=["web"])
        assert [inode(h.sock) for h in claimed.sockets] == [inode(web)]
        claimed.close()
        # The newest silent connection is closed by its first-message deadline.
        last = silent[-1]
        last.settimeout(DEFAULT_FIRST_MESSAGE_TIMEOUT + 10)
        started = time.monotonic()
        assert last.recv(65536) == b""
        assert time.monotonic() - started <= DEFAULT_FIRST_MESSAGE_TIMEOUT + 5
    finally:
        for conn in silent:
            conn.close()
        web.close()
