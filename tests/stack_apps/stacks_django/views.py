"""The matrix's endpoints as Django views."""

from __future__ import annotations

import time
from collections.abc import Iterator

import stackapp
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, StreamingHttpResponse


def _with_identity(
    response: HttpResponse | StreamingHttpResponse,
) -> HttpResponse | StreamingHttpResponse:
    for name, value in stackapp.headers():
        response[name] = value
    return response


def fast(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    return _with_identity(HttpResponse(f"fast {stackapp.identity()}\n", content_type="text/plain"))


def slow(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    time.sleep(stackapp.SLOW_SECONDS)
    return _with_identity(HttpResponse(f"slow {stackapp.identity()}\n", content_type="text/plain"))


def stream(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    def events() -> Iterator[bytes]:
        for index in range(stackapp.STREAM_CHUNKS):
            if index:
                time.sleep(stackapp.STREAM_INTERVAL)
            yield stackapp.stream_event(index)

    return _with_identity(StreamingHttpResponse(events(), content_type="text/event-stream"))


def echo(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    return _with_identity(HttpResponse(request.body, content_type="application/octet-stream"))
