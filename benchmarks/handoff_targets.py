"""What the connection-handoff benchmarks run: the demo app and the stack
matrix's cells under ``nodrop run``, with and without ``--handoff``, and
what they measure beside the clients: peak fds per process and the
supervisor's memory.

The command lines come from :mod:`stack_matrix.cells` (written once there),
so a cell whose adapter gains handoff support is measured with it the next
run, and a cell whose server has none shows what it gets. Only the idle
keep-alive timeout is raised (``--keep-alive-timeout``, default 300 s): the
connections under test must outlive the time it takes to open and check
10,000 of them, or the server's own timeout, not the reload, would close
them.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stack_matrix.cells import (  # noqa: E402
    AIOHTTP_ADAPTER,
    CELLS,
    GUNICORN,
    HYPERCORN,
    PY,
    UVICORN,
    Cell,
    Kind,
)
from stack_matrix.launch import NodropStack  # noqa: E402

NODROP_CELLS = [c for c in CELLS if c.kind is Kind.NODROP]
DEMO = Cell("demo", "demo", (PY, "-m", "nodrop.demo.app"), workers=2, websocket=False)
DEFAULT_CELLS = (
    "fastapi/uvicorn-h11",
    "fastapi/gunicorn-uvicorn-worker",
    "fastapi/hypercorn-asyncio",
    "aiohttp/aiohttp-adapter",
    "django/gunicorn-sync",
)
"""One cell per server (and one server without handoff support)."""
DRAIN_TIMEOUT = "20"


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to at least ``wanted`` (the hard limit too, where
    we may); children started from here inherit it. Returns the limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def select_cells(wanted: list[str]) -> list[Cell]:
    """``demo`` and cells by id or prefix (``hypercorn`` matches every hypercorn cell)."""
    out: list[Cell] = []
    for name in wanted:
        if name == "demo":
            out.append(DEMO)
            continue
        found = [c for c in NODROP_CELLS if c.id == name] or [
            c for c in NODROP_CELLS if c.id.startswith(name) or c.stack == name
        ]
        if not found:
            raise SystemExit(f"no cell {name!r}; cells: {', '.join(c.id for c in NODROP_CELLS)}")
        out += [c for c in found if c not in out]
    return out


def _with_option(argv: list[str], option: str, value: str, after: int) -> list[str]:
    """``argv`` with ``option value``: replaced where present, else inserted
    after the first ``after`` words (the program, before the app's name)."""
    if option in argv:
        index = argv.index(option)
        return [*argv[: index + 1], value, *argv[index + 2 :]]
    return [*argv[:after], option, value, *argv[after:]]


def with_keepalive(cell: Cell, seconds: int, workdir: Path) -> Cell:
    """The cell with its server's idle keep-alive timeout set to ``seconds``."""
    argv = list(cell.argv)
    prefix = tuple(argv[:3])
    if tuple(argv[: len(GUNICORN)]) == GUNICORN:
        argv = _with_option(argv, "--keep-alive", str(seconds), len(GUNICORN))
    elif prefix == UVICORN:
        argv = _with_option(argv, "--timeout-keep-alive", str(seconds), 3)
    elif prefix == AIOHTTP_ADAPTER:
        argv = _with_option(argv, "--keepalive-timeout", str(seconds), 3)
    elif prefix == HYPERCORN:
        config = workdir / "hypercorn.toml"
        text = ""
        if "--config" in argv:
            text = Path(argv[argv.index("--config") + 1]).read_text()
        config.write_text(text + f"\nkeep_alive_timeout = {seconds}\n")
        argv = _with_option(argv, "--config", str(config), 3)
    return dataclasses.replace(cell, argv=tuple(argv))


@contextmanager
def running(
    cell: Cell, handoff: bool, workdir: Path, keepalive: int = 300
) -> Iterator[NodropStack]:
    """The cell under ``nodrop run`` (``--handoff`` or ``--no-handoff``),
    its server's idle keep-alive timeout set to ``keepalive`` seconds (0:
    the cell's own)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if keepalive:
        cell = with_keepalive(cell, keepalive, workdir)
    flag = "--handoff" if handoff else "--no-handoff"
    cell = dataclasses.replace(
        cell, run_args=(*cell.run_args, flag, "--drain-timeout", DRAIN_TIMEOUT)
    )
    stack = NodropStack(cell, workdir, startup=0.2).start()
    try:
        yield stack
    finally:
        stack.stop()


def label(cell: Cell, handoff: bool) -> str:
    return f"{cell.id} ({'handoff' if handoff else '--no-handoff'})"


# -- what the processes hold ---------------------------------------------------------


def _children() -> dict[int, int]:
    """pid -> ppid of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kib(pid: int, key: str = "VmHWM") -> int | None:
    """``VmHWM`` (peak resident set) or ``VmRSS`` of a process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class FdPeaks:
    """Samples the fd count of a supervisor and every process below it
    (every ``interval`` seconds, in a thread) and keeps each one's peak."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.parents: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FdPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            parents = _children()
            tree = {self.root}
            grew = True
            while grew:
                below = {p for p, pp in parents.items() if pp in tree and p not in tree}
                tree |= below
                grew = bool(below)
            for pid in tree:
                count = _fds(pid)
                if count is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), count)
                    self.parents.setdefault(pid, parents.get(pid, 0))
            self._stop.wait(self.interval)

    def peak_of(self, workers: set[int]) -> int | None:
        """The highest peak of one process among ``workers`` and their descendants."""

        def belongs(pid: int) -> bool:
            for _ in range(16):
                if pid in workers:
                    return True
                if pid == self.root or pid not in self.parents:
                    return False
                pid = self.parents[pid]
            return False

        found = [n for pid, n in self.peaks.items() if belongs(pid)]
        return max(found) if found else None


def worker_pids(status: dict[str, Any], generation: int | None) -> set[int]:
    for gen in status.get("generations", []):
        if gen["generation"] == generation:
            return {w["pid"] for w in gen["workers"]}
    return set()


def elapsed(started: float) -> float:
    return time.monotonic() - started
