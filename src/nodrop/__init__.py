"""nodrop: reload Linux network servers without dropping a connection.

The library side, for servers:

* :func:`listen_fds` — the sockets passed by ``nodrop run`` or systemd;
* :func:`ready`, :func:`reloading`, :func:`stopping`, :func:`status`,
  :func:`notify` — tell the supervisor (or systemd) how you are doing;
* :func:`parse_spec`, :func:`identify` — listener specs and what the kernel
  says a socket is.
"""

from nodrop._platform import require_linux

require_linux()

from nodrop._version import __version__  # noqa: E402
from nodrop.errors import (  # noqa: E402
    ActivationError,
    BindError,
    ConfigError,
    ControlError,
    NodropError,
    NotifyError,
    PeerDeniedError,
    ProtocolError,
    SpecError,
    TruncatedError,
    UnsupportedPlatformError,
)
from nodrop.listeners.identity import SocketIdentity, identify  # noqa: E402
from nodrop.listeners.spec import ListenerOptions, ListenerSpec, parse_spec  # noqa: E402
from nodrop.systemd.activation import InheritedSocket, listen_fds  # noqa: E402
from nodrop.systemd.notify import notify, ready, reloading, status, stopping  # noqa: E402

__all__ = [
    "ActivationError",
    "BindError",
    "ConfigError",
    "ControlError",
    "InheritedSocket",
    "ListenerOptions",
    "ListenerSpec",
    "NodropError",
    "NotifyError",
    "PeerDeniedError",
    "ProtocolError",
    "SocketIdentity",
    "SpecError",
    "TruncatedError",
    "UnsupportedPlatformError",
    "__version__",
    "identify",
    "listen_fds",
    "notify",
    "parse_spec",
    "ready",
    "reloading",
    "status",
    "stopping",
]
