"""Real servers under `nodrop run`: ten reloads under load, nothing dropped.

Each recipe of ``examples/`` runs as its README says, under a real
supervisor. Two independent clients open a new connection per request
while ten reloads go through: ``wrk`` (``Connection: close``) and nodrop's
load generator (``Mode.CLOSE``, reloading through the control socket, so
every reload window is exact). Both must report zero failures.

A recipe whose server or client is not installed is skipped with the reason.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import HERE, Procs
from nodrop.load import LoadConfig, LoadResult, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from supervisor_harness import Supervised, http_get, start

EXAMPLES = HERE.parent / "examples"
SERVERS = HERE / "children" / "servers"
RELOADS = 10
CONCURRENCY = 16
PY = sys.executable


@dataclass(frozen=True)
class Recipe:
    """How one server runs under `nodrop run` (mirrors its examples/ README)."""

    id: str
    command: Callable[[Path, int], list[str]]
    run_args: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    app_dir: Path | None = None
    expect: str = "gen="
    env: dict[str, str] = field(default_factory=dict)
    port_in_config: bool = False
    """The server's own config names the port (lighttpd matches each inherited
    socket to a configured address): the test binds port 0 itself and hands
    the socket to nodrop as systemd's socket activation would."""

    def missing(self) -> str | None:
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"python package {module} is not installed (pip install -e '.[test]')"
        for binary in self.binaries:
            if shutil.which(binary) is None:
                return f"{binary} is not installed (apt-get install {binary})"
        return None


def lighttpd_command(tmp_path: Path, port: int) -> list[str]:
    conf = (EXAMPLES / "lighttpd" / "lighttpd.conf").read_text()
    conf = conf.replace("/srv/www", str(EXAMPLES / "lighttpd" / "www"))
    conf = conf.replace("server.port = 8000", f"server.port = {port}")
    conf = conf.replace('server.bind = "0.0.0.0"', 'server.bind = "127.0.0.1"')
    path = tmp_path / "lighttpd.conf"
    path.write_text(conf)
    return [shutil.which("lighttpd") or "lighttpd", "-D", "-f", str(path)]


PLAIN_CLI_DROPS = (
    "the plain command line closes connections it accepted an instant before "
    "SIGTERM, before reading their request, and Server.close() can reset accepted "
    "connections on Python 3.11; the nodrop.adapters recipe is the zero-drop one"
)

RECIPES = [
    Recipe(
        "uvicorn-fd",
        lambda tmp, port: [PY, "-m", "uvicorn", "app:app", "--fd", "3", "--log-level", "warning"],
        ("--ready", "delay:0.5"),
        modules=("uvicorn",),
        app_dir=EXAMPLES / "uvicorn",
    ),
    Recipe(
        "uvicorn-adapter",
        lambda tmp, port: [
            PY,
            "-m",
            "nodrop.adapters.uvicorn",
            "app:app",
            "--log-level",
            "warning",
        ],
        modules=("uvicorn",),
        app_dir=EXAMPLES / "uvicorn",
    ),
    Recipe(
        "gunicorn",
        lambda tmp, port: [
            PY,
            "-m",
            "gunicorn",
            "-c",
            "python:nodrop.adapters.gunicorn",
            "--workers",
            "2",
            "--log-level",
            "warning",
            "app:app",
        ],
        modules=("gunicorn",),
        app_dir=EXAMPLES / "gunicorn",
    ),
    Recipe(
        "hypercorn-fd",
        lambda tmp, port: [PY, "-m", "hypercorn", "--bind", "fd://3", "app:app"],
        ("--ready", "delay:0.7"),
        modules=("hypercorn",),
        app_dir=EXAMPLES / "hypercorn",
    ),
    Recipe(
        "hypercorn-adapter",
        lambda tmp, port: [PY, "-m", "nodrop.adapters.hypercorn", "app:app"],
        modules=("hypercorn",),
        app_dir=EXAMPLES / "hypercorn",
    ),
    Recipe(
        "aiohttp",
        lambda tmp, port: [PY, str(EXAMPLES / "aiohttp" / "server.py")],
        modules=("aiohttp",),
    ),
    Recipe(
        "stdlib-socketserver",
        lambda tmp, port: [PY, str(EXAMPLES / "stdlib" / "socketserver_http.py")],
    ),
    Recipe(
        "stdlib-asyncio",
        lambda tmp, port: [PY, str(EXAMPLES / "stdlib" / "asyncio_server.py")],
    ),
    Recipe(
        "lighttpd",
        lighttpd_command,
        ("--ready", "delay:0.3", "--drain-signal", "SIGINT"),
        binaries=("lighttpd",),
        expect="served by lighttpd",
        port_in_config=True,
    ),
]

# -- wrk ------------------------------------------------------------------------

_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_REQUESTS = re.compile(r"(\d+) requests in ")


@dataclass(frozen=True)
class WrkReport:
    requests: int
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non_2xx_3xx: int = 0

    @property
    def failed(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non_2xx_3xx


def parse_wrk(text: str) -> WrkReport:
    """wrk's summary; absent error lines mean zero (pure)."""
    requests = _REQUESTS.search(text)
    if requests is None:
        raise ValueError(f"not a wrk report:\n{text}")
    errors = _SOCKET_ERRORS.search(text)
    non_2xx = _NON_2XX.search(text)
    connect, read, write, timeout = (int(n) for n in errors.groups()) if errors else (0, 0, 0, 0)
    return WrkReport(
        int(requests.group(1)),
        connect,
        read,
        write,
        timeout,
        int(non_2xx.group(1)) if non_2xx else 0,
    )


WRK_SAMPLES = [
    ("  1000 requests in 4.00s, 1 MB read\n", WrkReport(1000)),
    (
        "  12 requests in 4.00s\n  Socket errors: connect 1, read 2, write 3, timeout 4\n"
        "  Non-2xx or 3xx responses: 5\n",
        WrkReport(12, 1, 2, 3, 4, 5),
    ),
    ("  7 requests in 1.00s\n  Non-2xx or 3xx responses: 2\n", WrkReport(7, non_2xx_3xx=2)),
]


@pytest.mark.parametrize(("text", "expected"), WRK_SAMPLES)
def test_parse_wrk(text: str, expected: WrkReport) -> None:
    assert parse_wrk(text) == expected
    assert (expected.failed == 0) == (expected == WrkReport(expected.requests))


def run_wrk(port: int, seconds: int) -> tuple[WrkReport, str]:
    argv = [
        "wrk", "-t1", f"-c{CONCURRENCY}", f"-d{seconds}s", "--timeout", "5s",
        "-H", "Connection: close", f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    return parse_wrk(out.stdout), out.stdout + out.stderr


# -- the test -------------------------------------------------------------------


SUPERVISOR_ARGS = ("--ready-grace", "0.05", "--ready-timeout", "20", "--drain-timeout", "20")


def supervise(procs: Procs, tmp_path: Path, recipe: Recipe) -> tuple[Supervised, int]:
    """The recipe under `nodrop run` on port 0; the supervisor and the port."""
    env = dict(recipe.env)
    if recipe.app_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(recipe.app_dir), *sys.path])
    if recipe.port_in_config:
        with socket.create_server(("127.0.0.1", 0), backlog=4096) as sock:
            port = sock.getsockname()[1]
            sup = start(
                procs,
                tmp_path,
                *SUPERVISOR_ARGS,
                *recipe.run_args,
                command=recipe.command(tmp_path, port),
                env=env,
                activate=(sock, "web"),
            )
        return sup, port
    sup = start(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        *SUPERVISOR_ARGS,
        *recipe.run_args,
        command=recipe.command(tmp_path, 0),
        env=env,
    )
    return sup, sup.port()


def hammer(sup: Supervised, port: int) -> tuple[LoadResult, WrkReport, str]:
    """Ten reloads under wrk and the load generator at once."""
    reloader = ControlReloader(sup.control, timeout=60)
    warm = reloader.reload()
    assert warm.ok, f"{warm.message}\n{sup.log()}"
    assert warm.finished is not None
    # Long enough for ten reloads back to back, with a margin for a busy machine.
    seconds = math.ceil(1.5 + RELOADS * (warm.finished - warm.started) * 1.4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        wrk = pool.submit(run_wrk, port, seconds)
        result = run_load(
            LoadConfig(
                host="127.0.0.1",
                port=port,
                mode=Mode.CLOSE,
                concurrency=CONCURRENCY,
                duration=seconds,
                processes=1,
                reload_every=0.05,
                reloads=RELOADS,
                timeout=5.0,
            ),
            reloader,
        )
        report, text = wrk.result()
    return result, report, text


MEASURE_PLAIN = os.environ.get("NODROP_MEASURE_PLAIN_SERVERS") == "1"


def params(recipes: list[Recipe]) -> list[object]:
    """The recipes; the plain uvicorn/hypercorn command lines are a documented
    limitation (they drop a few requests per reload), measured on demand with
    NODROP_MEASURE_PLAIN_SERVERS=1, where the test then fails with the counts."""
    out: list[object] = []
    for recipe in recipes:
        marks = []
        if recipe.id.endswith("-fd") and not MEASURE_PLAIN:
            marks.append(
                pytest.mark.skip(
                    reason=f"{PLAIN_CLI_DROPS} (measure: NODROP_MEASURE_PLAIN_SERVERS=1)"
                )
            )
        out.append(pytest.param(recipe, id=recipe.id, marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", params(RECIPES))
def test_ten_reloads_under_wrk_and_load_generator_drop_nothing(
    recipe: Recipe, procs: Procs, tmp_path: Path
) -> None:
    missing = recipe.missing() or (None if shutil.which("wrk") else "wrk is not installed")
    if missing:
        pytest.skip(missing)
    sup, port = supervise(procs, tmp_path, recipe)
    try:
        assert recipe.expect in http_get(port)
        result, wrk, wrk_text = hammer(sup, port)
        reloads = [r for r in result.reloads if r.ok]
        assert len(reloads) == RELOADS, (
            [r.message for r in result.reloads],
            sup.log()[-3000:],
        )
        assert result.failed == 0, (
            {k: v for k, v in result.outcomes.items() if v},
            sup.log()[-1500:],
        )
        assert result.ok > 200, "the load generator barely ran"
        assert wrk.failed == 0, wrk_text
        assert wrk.requests > 200, wrk_text
        status = sup.status()
        assert status["active_generation"] == RELOADS + 2
        assert sup.stop() == 0
    finally:
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGTERM)
            sup.proc.wait(timeout=30)
        sup.notify.close()
