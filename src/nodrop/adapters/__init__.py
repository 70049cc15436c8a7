"""Small adapters for servers that almost follow nodrop's conventions.

Each one removes a real piece of friction and nothing more:

* :mod:`nodrop.adapters.drain` -- stop an ``asyncio`` server without resetting
  connections it already accepted (``drain``, ``stop_accepting``);
* :mod:`nodrop.adapters.uvicorn` -- ``python -m nodrop.adapters.uvicorn
  app:app``: uvicorn on every inherited socket, ``READY=1`` once it serves,
  and a drain that resets nothing;
* :mod:`nodrop.adapters.gunicorn` -- a gunicorn config module that says
  ``READY=1`` only once a worker has loaded the application.

The package imports nothing from the servers themselves: the uvicorn and
gunicorn modules import them when used.
"""

from nodrop.adapters.drain import DEFAULT_DRAIN_TIMEOUT, DEFAULT_SETTLE, drain, stop_accepting

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DEFAULT_SETTLE", "drain", "stop_accepting"]
