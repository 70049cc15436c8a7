"""The realistic app of ``stack_starlette.py``, written for aiohttp.

``create_app()`` is the app factory (``python -m nodrop.adapters.aiohttp
stack_aiohttp:create_app``); its ``on_startup`` takes $STARTUP_SECONDS
(default 1). Same endpoints: /fast, /slow (0.5 s), /stream (chunked, 2 s),
POST /echo, and a WebSocket echo at /ws. $APP_VERSION ``broken-start``
makes ``on_startup`` raise, ``broken-import`` makes the import fail.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import WSMsgType, web

VERSION = os.environ.get("APP_VERSION", "good")
STARTUP_SECONDS = float(os.environ.get("STARTUP_SECONDS", "1"))
GENERATION = os.environ.get("NODROP_GENERATION", "?")
STREAM_CHUNKS = 20

if VERSION == "broken-import":
    raise ImportError("broken-import: this version cannot be imported")


def who() -> str:
    return f"version={VERSION} gen={GENERATION} pid={os.getpid()}"


async def fast(request: web.Request) -> web.Response:
    return web.Response(text=who())


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.5)
    return web.Response(text=who())


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_type = "text/plain"
    await response.prepare(request)
    for number in range(STREAM_CHUNKS):
        await response.write(b"chunk %02d\n" % number)
        await asyncio.sleep(2 / STREAM_CHUNKS)
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def start_up(app: web.Application) -> None:
    await asyncio.sleep(STARTUP_SECONDS)
    if VERSION == "broken-start":
        raise RuntimeError("broken-start: the database is unreachable")


def create_app() -> web.Application:
    app = web.Application(client_max_size=4 << 20)
    app.on_startup.append(start_up)
    app.router.add_get("/fast", fast)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    app.router.add_post("/echo", echo)
    app.router.add_get("/ws", ws_echo)
    return app
