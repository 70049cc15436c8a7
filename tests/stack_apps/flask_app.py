"""A Flask app with the matrix's HTTP endpoints; its start-up (about 1 s) is
paid when gunicorn's worker imports it.

    gunicorn flask_app:app
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import stackapp
from flask import Flask, Response, request

stackapp.fail_import_if_asked()


def create_app() -> Flask:
    stackapp.start_up_blocking()
    flask_app = Flask(__name__)

    @flask_app.get("/fast")
    def fast() -> Response:
        return Response(
            f"fast {stackapp.identity()}\n", mimetype="text/plain", headers=stackapp.headers()
        )

    @flask_app.get("/slow")
    def slow() -> Response:
        time.sleep(stackapp.SLOW_SECONDS)
        return Response(
            f"slow {stackapp.identity()}\n", mimetype="text/plain", headers=stackapp.headers()
        )

    @flask_app.get("/stream")
    def stream() -> Response:
        def events() -> Iterator[bytes]:
            for index in range(stackapp.STREAM_CHUNKS):
                if index:
                    time.sleep(stackapp.STREAM_INTERVAL)
                yield stackapp.stream_event(index)

        return Response(events(), mimetype="text/event-stream", headers=stackapp.headers())

    @flask_app.post("/echo")
    def echo() -> Response:
        return Response(
            request.get_data(), mimetype="application/octet-stream", headers=stackapp.headers()
        )

    return flask_app


app = create_app()
