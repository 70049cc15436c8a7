"""A realistic Starlette app for the reload tests of the ASGI adapters.

Start-up (the lifespan) takes $STARTUP_SECONDS (default 1). Endpoints:

* ``GET /fast`` -- answers at once, with the generation and pid;
* ``GET /slow`` -- answers after 0.5 s;
* ``GET /stream`` -- a chunked response of 20 chunks over 2 s (``chunk NN``);
* ``POST /echo`` -- the request body, whatever its size (1 MB in the tests);
* ``WS /ws`` -- echoes every text message.

$APP_VERSION chooses a broken version: ``broken-start`` (the lifespan raises)
or ``broken-import`` (importing this module fails).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

VERSION = os.environ.get("APP_VERSION", "good")
STARTUP_SECONDS = float(os.environ.get("STARTUP_SECONDS", "1"))
GENERATION = os.environ.get("NODROP_GENERATION", "?")
STREAM_CHUNKS = 20

if VERSION == "broken-import":
    raise ImportError("broken-import: this version cannot be imported")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await asyncio.sleep(STARTUP_SECONDS)
    if VERSION == "broken-start":
        raise RuntimeError("broken-start: the database is unreachable")
    yield


def who() -> str:
    return f"version={VERSION} gen={GENERATION} pid={os.getpid()}"


async def fast(request: Request) -> Response:
    return PlainTextResponse(who())


async def slow(request: Request) -> Response:
    await asyncio.sleep(0.5)
    return PlainTextResponse(who())


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for number in range(STREAM_CHUNKS):
            yield b"chunk %02d\n" % number
            await asyncio.sleep(2 / STREAM_CHUNKS)

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/fast", fast),
        Route("/slow", slow),
        Route("/stream", stream),
        Route("/echo", echo, methods=["POST"]),
        WebSocketRoute("/ws", ws_echo),
    ],
    lifespan=lifespan,
)
