"""WebSocket sessions held open across reloads (``websockets``' sync client).

Each session sends a message every 0.2-1 s on ``/ws`` and expects it back.
How a session ends is what counts: closed by the server with 1012 "Service
Restart" is a reconnect (the client opens a new session, as browsers' and
libraries' reconnect logic does); any other close code, a close with no
close frame (TCP FIN or reset: 1006), a wrong echo or a failed handshake is a
failure. A session that is never cut is best of all.
"""

from __future__ import annotations

import random

from stack_matrix.httpclients import HOST, ThreadedClient
from stack_matrix.outcomes import Failure

SERVICE_RESTART = 1012
MESSAGE_GAP = (0.2, 1.0)


class WebSocketClient(ThreadedClient):
    name = "websocket"

    def connection(self, index: int, rng: random.Random) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        session = 0
        while not self.stopping.is_set():
            session += 1
            try:
                ws = connect(
                    f"ws://{HOST}:{self.port}/ws",
                    open_timeout=self.timeout,
                    close_timeout=5,
                    max_size=2**20,
                )
            except InvalidStatus as exc:
                self.report.fail(Failure.WS_HANDSHAKE, "ws", f"handshake: {exc!r}")
                self.stopping.wait(0.2)
                continue
            except ConnectionRefusedError as exc:
                self.report.fail(Failure.REFUSED, "ws", f"connect: {exc!r}")
                self.stopping.wait(0.2)
                continue
            except (OSError, InvalidHandshake) as exc:
                kind = Failure.TIMEOUT if isinstance(exc, TimeoutError) else Failure.WS_HANDSHAKE
                self.report.fail(kind, "ws", f"handshake: {exc!r}")
                self.stopping.wait(0.2)
                continue
            self.report.count("sessions")
            generation = ws.response.headers.get("X-Generation", "?") if ws.response else "?"
            seq = 0
            with ws:
                try:
                    while not self.stopping.wait(rng.uniform(*MESSAGE_GAP)):
                        seq += 1
                        message = f"{index}.{session}.{seq}"
                        ws.send(message)
                        reply = ws.recv(timeout=self.timeout)
                        if reply != message:
                            self.report.fail(
                                Failure.WS_ECHO_BAD,
                                "ws",
                                f"sent {message!r}, got {reply!r}",
                                generation,
                            )
                            break
                        self.report.succeeded(generation)
                except ConnectionClosed as exc:
                    self._ended(exc, generation)
                except TimeoutError:
                    self.report.fail(Failure.TIMEOUT, "ws", "no echo in time", generation)
                except OSError as exc:
                    self.report.fail(Failure.WS_RESET, "ws", repr(exc), generation)

    def _ended(self, exc: Exception, generation: str) -> None:
        received = getattr(exc, "rcvd", None)
        if received is None:
            self.report.fail(
                Failure.WS_RESET, "ws", f"closed without a close frame: {exc}", generation
            )
        elif received.code == SERVICE_RESTART:
            self.report.reconnected()
        else:
            self.report.fail(
                Failure.WS_CLOSED,
                "ws",
                f"closed with {received.code} {received.reason!r}",
                generation,
            )
