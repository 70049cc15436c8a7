"""A receiving worker for the broker tests, driven by argv.

    keepalive_receiver.py PATH ROOM MODE

Registers with the broker at PATH, prints ``registered``; then per MODE:
``die`` — exit abruptly as soon as a batch arrives, before acknowledging it;
``take`` — adopt batches, print ``got N`` for each, keep them until stdin closes.
"""

from __future__ import annotations

import os
import sys
import threading

from nodrop.connhandoff.client import Receiver


def main() -> None:
    path, room, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    receiver = Receiver.register(path, room=room)
    print("registered", flush=True)
    if mode == "die":
        receiver.channel.recv(max_fds=253)
        os._exit(3)
    kept = []
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while (batch := receiver.receive(0)) is not None:
        kept.extend(batch)
        print(f"got {len(batch)}", flush=True)


if __name__ == "__main__":
    main()
