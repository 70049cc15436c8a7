"""The socket holder: park listening sockets across a stop-then-start restart.

* :mod:`nodrop.holder.ops` — the requests, parsed (pure);
* :mod:`nodrop.holder.daemon` — :class:`Holder`, the ``nodrop hold`` server;
* :mod:`nodrop.holder.client` — :func:`deposit`, :func:`claim`,
  :func:`list_parked`, :func:`release`.

See ``docs/holder.md``.
"""

from __future__ import annotations

from nodrop.holder.client import (
    ClaimResult,
    DepositResult,
    ParkedInfo,
    claim,
    deposit,
    list_parked,
    release,
    spawn_holder,
)
from nodrop.holder.config import HolderConfig
from nodrop.holder.daemon import Holder

__all__ = [
    "ClaimResult",
    "DepositResult",
    "Holder",
    "HolderConfig",
    "ParkedInfo",
    "claim",
    "deposit",
    "list_parked",
    "release",
    "spawn_holder",
]
