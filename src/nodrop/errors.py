"""The exception hierarchy: one root, specific subclasses.

Library code raises these; only the CLI turns them into messages and exit
codes.
"""

from __future__ import annotations


class NodropError(Exception):
    """Root of every error nodrop raises on purpose."""


class UnsupportedPlatformError(NodropError):
    """nodrop needs Linux (SO_REUSEPORT, SCM_RIGHTS, SO_PEERCRED, pidfds)."""


class SpecError(NodropError, ValueError):
    """A listener spec could not be parsed.

    Attributes:
        spec: the whole spec as given.
        part: the offending part of it.
    """

    def __init__(self, spec: str, part: str, reason: str) -> None:
        self.spec = spec
        self.part = part
        self.reason = reason
        super().__init__(f"bad listener spec {spec!r}: {part!r}: {reason}")


class BindError(NodropError, OSError):
    """A listener could not be created or bound (port in use, permission...)."""


class ActivationError(NodropError):
    """Malformed systemd socket-activation variables (LISTEN_FDS & co)."""


class NotifyError(NodropError):
    """A sd_notify message could not be sent or is malformed."""


class ProtocolError(NodropError):
    """A peer sent something that violates a nodrop wire protocol."""


class TruncatedError(ProtocolError):
    """A message or its file descriptors were cut short by the kernel."""


class PeerDeniedError(NodropError, PermissionError):
    """The peer on a Unix socket is not allowed (SO_PEERCRED check failed)."""


class UntrustedError(NodropError, PermissionError):
    """A path nodrop would rely on is not ours: a control directory owned by
    another uid, a symlink, or writable by others; or a control socket served
    by another uid."""


class ConfigError(NodropError, ValueError):
    """A configuration file or command line is invalid."""


class ControlError(NodropError):
    """The supervisor's control socket could not be reached or refused a request."""


class BpfError(NodropError, OSError):
    """A bpf(2) call failed: map creation, program load, or a map update.

    Program-load failures carry the verifier log in the message.
    """


class NetnsError(NodropError, OSError):
    """A private network namespace could not be made or used, or a sysctl
    write was refused because the caller is in the host's network namespace."""


class LoadError(NodropError):
    """The load generator could not run (a worker failed, hung or was misconfigured)."""


class HolderError(NodropError):
    """The socket holder (``nodrop hold``) could not be reached or refused a request."""


class UpgradeError(NodropError):
    """A self-upgrade was refused: not ready yet, one already running, or done."""
