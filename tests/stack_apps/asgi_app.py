"""The same app as ``fastapi_app`` in plain ASGI, with no framework: what the
server itself does, without Starlette's help (lifespan, streaming, WebSocket).

    uvicorn asgi_app:app
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import stackapp

stackapp.fail_import_if_asked()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _headers(content_type: bytes) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", content_type)]
    out += [(k.lower().encode(), v.encode()) for k, v in stackapp.headers()]
    return out


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [*_headers(content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away during the upload")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    method, path = scope["method"], scope["path"]
    text = b"text/plain; charset=utf-8"
    if method == "GET" and path == "/fast":
        await _respond(send, 200, f"fast {stackapp.identity()}\n".encode(), text)
    elif method == "GET" and path == "/slow":
        await asyncio.sleep(stackapp.SLOW_SECONDS)
        await _respond(send, 200, f"slow {stackapp.identity()}\n".encode(), text)
    elif method == "GET" and path == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _headers(b"text/event-stream"),
            }
        )
        for index in range(stackapp.STREAM_CHUNKS):
            if index:
                await asyncio.sleep(stackapp.STREAM_INTERVAL)
            await send(
                {
                    "type": "http.response.body",
                    "body": stackapp.stream_event(index),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    elif method == "POST" and path == "/echo":
        await _respond(send, 200, await _read_body(receive), b"application/octet-stream")
    else:
        await _respond(send, 404, b"not found\n", text)


async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] != "/ws":
        await send({"type": "websocket.close", "code": 1008})
        return
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.connect":
            accept_headers = [(k.lower().encode(), v.encode()) for k, v in stackapp.headers()]
            await send({"type": "websocket.accept", "headers": accept_headers})
        elif kind == "websocket.receive":
            reply: Message = {"type": "websocket.send"}
            if message.get("text") is not None:
                reply["text"] = message["text"]
            else:
                reply["bytes"] = message.get("bytes") or b""
            await send(reply)
        elif kind == "websocket.disconnect":
            return


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await stackapp.start_up()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    handler = {"http": http, "websocket": websocket, "lifespan": lifespan}[scope["type"]]
    await handler(scope, receive, send)
