"""Small adapters for servers that almost follow nodrop's conventions.

Each one removes a real piece of friction and nothing more:

* :mod:`nodrop.adapters.drain` -- stop an ``asyncio`` server without resetting
  connections it already accepted (``drain``, ``stop_accepting``);
* :mod:`nodrop.adapters.uvicorn` -- ``python -m nodrop.adapters.uvicorn
  app:app``: uvicorn (asyncio or uvloop, h11 or httptools) on every
  inherited socket, ``READY=1`` after the lifespan start-up, a drain that
  fails no request (``Connection: close`` on the next response, idle
  connections closed only at their keep-alive timeout) and, with
  connection handoff (``nodrop run``'s default), idle connections handed
  to the new generation;
  uvicorn's internals it relies on are in :mod:`nodrop.adapters.uvicorn_internals`;
* :mod:`nodrop.adapters.gunicorn` -- a gunicorn config module: ``READY=1``
  only once every worker has started its application (after the lifespan
  for ASGI workers; :mod:`nodrop.adapters.worker_readiness`), and
  ``UvicornWorker`` (both packages) and gunicorn's ``-k asgi``
  (:mod:`nodrop.adapters.gunicorn_asgi_internals`) drained and handed over
  like the uvicorn adapter;
* :mod:`nodrop.adapters.hypercorn`, :mod:`nodrop.adapters.aiohttp` -- the same
  for hypercorn and aiohttp;
* :mod:`nodrop.adapters.accept` -- the accept loop they share (stop accepting
  without closing, on any event loop; adopt handed-over connections);
* :mod:`nodrop.adapters.asgi` -- the drain's signals through the ASGI
  interface (``Connection: close``, WebSocket 1012).

The package imports nothing from the servers themselves: the uvicorn and
gunicorn modules import them when used.
"""

from nodrop.adapters.drain import DEFAULT_DRAIN_TIMEOUT, DEFAULT_SETTLE, drain, stop_accepting

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DEFAULT_SETTLE", "drain", "stop_accepting"]
