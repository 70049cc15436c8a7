"""A FastAPI app as people write them: a lifespan start-up, a fast and a slow
endpoint, a server-sent event stream, an upload echo and a WebSocket echo.

    uvicorn fastapi_app:app            (the endpoints: see stackapp.py)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import stackapp
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

stackapp.fail_import_if_asked()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await stackapp.start_up()
    yield


app = FastAPI(lifespan=lifespan)


def _headers() -> dict[str, str]:
    return dict(stackapp.headers())


@app.get("/fast")
async def fast() -> PlainTextResponse:
    return PlainTextResponse(f"fast {stackapp.identity()}\n", headers=_headers())


@app.get("/slow")
async def slow() -> PlainTextResponse:
    await asyncio.sleep(stackapp.SLOW_SECONDS)
    return PlainTextResponse(f"slow {stackapp.identity()}\n", headers=_headers())


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for index in range(stackapp.STREAM_CHUNKS):
            if index:
                await asyncio.sleep(stackapp.STREAM_INTERVAL)
            yield stackapp.stream_event(index)

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers())


@app.post("/echo")
async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, media_type="application/octet-stream", headers=_headers())


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept(headers=[(k.encode(), v.encode()) for k, v in stackapp.headers()])
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
