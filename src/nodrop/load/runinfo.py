"""What a report says about the run itself: the command that made it, the
versions, the strategy, the baseline it is measured against, and what to run
next against one's own app."""

from __future__ import annotations

import dataclasses
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence

from nodrop._version import __version__
from nodrop.load.result import LoadResult

NEXT_STEP = (
    "nodrop run --listen tcp://127.0.0.1:8000 --name myapp -- YOUR-SERVER-COMMAND   "
    "(then, in another shell) nodrop bench --name myapp --baseline --report myapp.html"
)
"""The "now run this against your app" line of every report."""


def versions(server: str | None = None) -> dict[str, str]:
    """nodrop's, Python's and the kernel's versions (and the server's, if known)."""
    out = {
        "nodrop": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    if server:
        out["server"] = server
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a shell would show it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["nodrop", *args])


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Context for a report.

    Attributes:
        command: the command line that produced the run.
        server: what served the load (a command, a name).
        strategy: nodrop's listener strategy, if nodrop ran the server.
        handoff: whether keep-alive connection handoff was on.
        versions: nodrop, python, kernel, server.
        baseline: the same load against a naive restart, measured in the same run.
        baseline_label: what the baseline was.
        next_step: a command line to run against one's own app.
    """

    command: str
    server: str
    strategy: str | None = None
    handoff: bool | None = None
    versions: Mapping[str, str] = dataclasses.field(default_factory=versions)
    baseline: LoadResult | None = None
    baseline_label: str = ""
    next_step: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "command": self.command,
            "server": self.server,
            "strategy": self.strategy,
            "handoff": self.handoff,
            "versions": dict(self.versions),
            "baseline_label": self.baseline_label,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "next_step": self.next_step,
        }
