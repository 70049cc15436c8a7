"""Run a load: start worker processes, trigger reloads, merge the results.

The runner is the only part that spawns processes. Workers are
``python -m nodrop.load.worker`` children (see :mod:`nodrop.load.worker`
for the handshake); reloads run in this process, on its main thread, at
``start + reload_every * (i + 1)`` for ``i < reloads`` while that is before
the end of the run -- one at a time, so a slow reload delays the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nodrop.errors import LoadError
from nodrop.load.config import LoadConfig
from nodrop.load.reload import Reloader, ReloadRecord
from nodrop.load.result import LoadResult
from nodrop.load.samples import Samples, decode
from nodrop.load.stats import summarize
from nodrop.load.worker import GO, READY, WorkerSpec

#: Deadline for every worker to import and report ready (seconds).
DEFAULT_STARTUP_TIMEOUT = 15.0
#: Grace after the run (beyond the attempt timeout) for workers to report.
DEFAULT_REPORT_GRACE = 15.0
#: Delay between "all ready" and the common start, so every GO line arrives first.
START_MARGIN = 0.05


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative integers (pure)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def reload_schedule(start: float, stop: float, every: float, count: int) -> list[float]:
    """Monotonic instants of the reloads: every ``every`` s, ``count`` times, before ``stop``."""
    return [t for i in range(count) if (t := start + every * (i + 1)) < stop]


def _worker_env() -> dict[str, str]:
    # Make the package importable in the child even from a source checkout.
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _spawn(specs: Sequence[WorkerSpec]) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    env = _worker_env()
    try:
        for spec in specs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nodrop.load.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(spec.to_json().encode() + b"\n")
            proc.stdin.flush()
    except BaseException:
        _reap(procs)
        raise
    return procs


def _read_all(
    procs: Sequence[subprocess.Popen[bytes]], deadline: float, until: bytes | None
) -> list[bytes]:
    """Read each worker's stdout until ``until`` arrives (or EOF when ``None``).

    Raises:
        LoadError: the deadline passed, or a worker closed stdout too early.
    """
    chunks = [bytearray() for _ in procs]
    with selectors.DefaultSelector() as sel:
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            sel.register(proc.stdout.fileno(), selectors.EVENT_READ, i)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadError("load workers did not report before the deadline")
            for key, _ in sel.select(left):
                i = key.data
                data = os.read(key.fd, 1 << 20)
                if data:
                    chunks[i] += data
                    if until is not None and chunks[i].endswith(until):
                        sel.unregister(key.fd)
                    continue
                sel.unregister(key.fd)
                if until is not None:
                    raise LoadError(f"load worker {procs[i].pid} exited early: {_stderr(procs[i])}")
    return [bytes(c) for c in chunks]


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if proc.stderr is None:
        return ""
    return proc.stderr.read().decode(errors="replace").strip()[-2000:]


def _reap(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill workers still running (by pid), wait for them, close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _do_reload(reloader: Reloader) -> ReloadRecord:
    started = time.monotonic()
    try:
        return reloader.reload()
    except Exception as exc:  # a reloader bug must not lose the run's data
        return ReloadRecord(
            started, None, None, False, f"reloader raised {exc!r}", time.monotonic()
        )


@dataclasses.dataclass(frozen=True)
class RawRun:
    """A run before summarizing: every attempt's sample and every reload's record.

    For callers that attribute latency to moments finer than reload windows
    (``benchmarks/reload_latency.py``).
    """

    samples: Samples
    records: tuple[ReloadRecord, ...]
    started: float
    ended: float
    processes: int

    def summarize(self, config: LoadConfig) -> LoadResult:
        """The :class:`LoadResult` that :func:`run_load` returns for this run."""
        return summarize(
            config,
            self.samples,
            list(self.records),
            started=self.started,
            ended=self.ended,
            processes=self.processes,
        )


def run_load(config: LoadConfig, reloader: Reloader | None = None) -> LoadResult:
    """Run a load and summarize it; see :func:`run_load_raw` for the arguments."""
    return run_load_raw(config, reloader).summarize(config)


def run_load_raw(config: LoadConfig, reloader: Reloader | None = None) -> RawRun:
    """Run a load against ``config.host:config.port``, reloading as configured.

    Bounded in time (``duration``, plus one attempt ``timeout`` for attempts
    in flight) and in count (``max_requests``).

    Args:
        config: what to load and how.
        reloader: called ``config.reloads`` times, every ``config.reload_every``
            seconds; ``None`` means no reloads.

    Returns:
        The merged raw samples and the reload records.

    Raises:
        LoadError: a worker failed to start, crashed, or did not report in time.
    """
    processes = config.effective_processes()
    specs = [
        WorkerSpec(
            host=config.host,
            port=config.port,
            mode=config.mode.value,
            concurrency=c,
            max_requests=m,
            timeout=config.timeout,
            path=config.path,
            tcp_line=config.tcp_line,
            start_at=0.0,
            stop_at=0.0,
        )
        for c, m in zip(
            split(config.concurrency, processes),
            split(config.max_requests, processes),
            strict=True,
        )
    ]
    procs = _spawn(specs)
    try:
        _read_all(procs, time.monotonic() + DEFAULT_STARTUP_TIMEOUT, READY)
        start = time.monotonic() + START_MARGIN
        stop = start + config.duration
        go = b"%s %r %r\n" % (GO, start, stop)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(go)
            proc.stdin.close()
        records: list[ReloadRecord] = []
        if reloader is not None:
            for at in reload_schedule(start, stop, config.reload_every, config.reloads):
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the schedule itself; the workers run meanwhile
                records.append(_do_reload(reloader))
        outputs = _read_all(procs, stop + config.timeout + DEFAULT_REPORT_GRACE, until=None)
        merged = Samples()
        for proc, output in zip(procs, outputs, strict=True):
            if proc.wait(timeout=10) != 0:
                raise LoadError(f"load worker {proc.pid} failed: {_stderr(proc)}")
            try:
                merged.extend(decode(output))
            except Exception as exc:
                raise LoadError(f"load worker {proc.pid} sent bad samples: {exc}") from exc
    finally:
        _reap(procs)
    return RawRun(merged, tuple(records), start, stop, processes)
