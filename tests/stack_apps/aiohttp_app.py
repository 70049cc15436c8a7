"""An aiohttp ``web.Application`` with the matrix's endpoints and a WebSocket
echo; its start-up (about 1 s) runs in ``on_startup``.

Run as a script, it serves the app on the sockets from ``nodrop run`` the way
the README's aiohttp recipe says (``examples/aiohttp/server.py``)::

    nodrop run --listen tcp://127.0.0.1:8000 -- python aiohttp_app.py

``create_app`` is the application factory, for a launcher that serves it.
"""

from __future__ import annotations

import asyncio
import signal

import stackapp
from aiohttp import WSMsgType, web

stackapp.fail_import_if_asked()


def _headers() -> dict[str, str]:
    return dict(stackapp.headers())


async def fast(request: web.Request) -> web.Response:
    return web.Response(text=f"fast {stackapp.identity()}\n", headers=_headers())


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(stackapp.SLOW_SECONDS)
    return web.Response(text=f"slow {stackapp.identity()}\n", headers=_headers())


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **_headers()})
    await response.prepare(request)
    for index in range(stackapp.STREAM_CHUNKS):
        if index:
            await asyncio.sleep(stackapp.STREAM_INTERVAL)
        await response.write(stackapp.stream_event(index))
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(body=body, content_type="application/octet-stream", headers=_headers())


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    ws.headers.update(_headers())
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _start_up(app: web.Application) -> None:
    await stackapp.start_up()


def create_app() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.on_startup.append(_start_up)
    app.router.add_get("/fast", fast)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    app.router.add_post("/echo", echo)
    app.router.add_get("/ws", ws_echo)
    return app


async def serve() -> None:
    """The README's recipe: the inherited socket in a ``SockSite``."""
    import nodrop
    from nodrop.adapters.drain import DEFAULT_SETTLE, stop_accepting

    (listener,) = nodrop.listen_fds()
    runner = web.AppRunner(create_app(), handle_signals=False, access_log=None)
    await runner.setup()  # runs on_startup
    await web.SockSite(runner, listener.socket).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nodrop.ready()
    await stop.wait()
    await stop_accepting([listener.socket], settle=DEFAULT_SETTLE)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
