"""Choosing the listener strategy for ``nodrop run``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nodrop.errors import ConfigError
from nodrop.listeners.held import HeldSocket
from nodrop.supervisor.config import RunConfig, Strategy
from nodrop.supervisor.inherit_listeners import InheritListeners, ListenerProvider


def make_listeners(
    config: RunConfig, inherited: Sequence[HeldSocket], log: Callable[[str], None]
) -> ListenerProvider:
    if config.strategy is Strategy.INHERIT:
        return InheritListeners(inherited)
    try:
        from nodrop.supervisor.reuseport_listeners import ReuseportListeners
    except ModuleNotFoundError:
        raise ConfigError("the reuseport strategy is not available in this build") from None
    return ReuseportListeners(config, inherited, log=log)
