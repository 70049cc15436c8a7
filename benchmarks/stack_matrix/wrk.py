"""``wrk`` as one of the matrix's clients, in close or keep-alive mode.

wrk runs until stopped (SIGINT makes it print its summary), asking for
``/fast`` and, with ``slow_share``, ``/slow`` on a share of requests (a Lua
script picks). Its own error classes are kept as they are -- wrk cannot
tell an EOF from a reset ("read"), nor a 4xx from a 5xx ("non-2xx"):

* ``connect``: connect() failed (refused, or timed out);
* ``read``: the connection ended or broke while wrk waited for a response
  (including an EOF on a kept-alive connection the server had not marked
  closing);
* ``write``: sending failed;
* ``timeout``: no response within ``--timeout``;
* ``non-2xx``: a response that is not 2xx or 3xx.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from baselines.cells import parse_wrk
from stack_matrix.httpclients import HOST
from stack_matrix.mix import REQUEST_TIMEOUT
from stack_matrix.outcomes import ClientReport

LUA = """\
local slow = tonumber(os.getenv("STACKS_WRK_SLOW_SHARE") or "0")
request = function()
  if slow > 0 and math.random() < slow then
    return wrk.format(nil, "/slow")
  end
  return wrk.format(nil, "/fast")
end
"""

WRK_ERRORS = ("connect", "read", "write", "timeout")


def wrk_binary() -> str | None:
    return shutil.which("wrk")


class WrkClient:
    """``wrk -t1 -cN`` until :meth:`stop`."""

    def __init__(
        self,
        port: int,
        *,
        close: bool,
        connections: int = 16,
        slow_share: float = 0.0,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.name = "wrk-close" if close else "wrk-keepalive"
        self.port = port
        self.close = close
        self.connections = connections
        self.slow_share = slow_share
        self.timeout = timeout
        self.report = ClientReport(self.name)
        self.raw = ""
        self._proc: subprocess.Popen[str] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="stacks-wrk-")

    def argv(self, binary: str, script: Path) -> list[str]:
        argv = [
            binary, "-t1", f"-c{self.connections}", "-d3600s", f"--timeout={self.timeout:g}s",
            "-s", str(script),
        ]  # fmt: skip
        if self.close:
            argv += ["-H", "Connection: close"]
        return [*argv, f"http://{HOST}:{self.port}/"]

    def start(self) -> None:
        binary = wrk_binary()
        if binary is None:
            self.report.error = "wrk is not installed (apt-get install wrk)"
            return
        script = Path(self._dir.name) / "mix.lua"
        script.write_text(LUA)
        env = {"STACKS_WRK_SLOW_SHARE": f"{self.slow_share:g}", "PATH": "/usr/bin:/bin"}
        self._proc = subprocess.Popen(
            self.argv(binary, script),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def warmed(self) -> bool:
        return True

    def stop(self, timeout: float = 30.0) -> ClientReport:
        proc = self._proc
        try:
            if proc is None:
                return self.report
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # wrk prints its summary and exits
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                self.report.error = f"wrk did not stop within {timeout:g}s of SIGINT"
            self.raw = out
            self._fill(out)
            return self.report
        finally:
            self._dir.cleanup()

    def _fill(self, out: str) -> None:
        try:
            parsed: dict[str, Any] = parse_wrk(out)
        except ValueError as exc:
            self.report.error = f"{exc}: {out[-400:]}"
            return
        self.report.ok = parsed["requests"] - parsed["non_2xx"]
        for kind in WRK_ERRORS:
            if parsed["errors"][kind]:
                self.report.failures[kind] = parsed["errors"][kind]
        if parsed["non_2xx"]:
            self.report.failures["non-2xx"] = parsed["non_2xx"]
        self.report.extra["requests"] = parsed["requests"]
