"""What ``nodrop run`` is asked to do: options from the command line and an
optional TOML file (pure: no I/O but reading the file's text).

A config file holds the same things as the command line::

    command = ["uvicorn", "app:app", "--fd", "3"]
    listen = ["tcp://0.0.0.0:8000?name=web"]
    workers = 2
    ready = "notify"            # or "delay:1.5"
    ready_timeout = 30
    ready_grace = 0.5           # new workers must stay up this long after READY=1
    drain_timeout = 30
    drain_signal = "SIGTERM"
    strategy = "inherit"        # or "reuseport"
    chdir = "/srv/app/current"  # each generation's working directory, resolved at its start
    startup_priority = "normal" # new workers' CPU priority until READY=1: normal, low, idle

    [env]                       # extra environment for the workers
    APP_ENV = "production"

On every reload the file is read again; a command line option given
explicitly wins over the file.
"""

from __future__ import annotations

import enum
import math
import os
import signal
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nodrop.errors import ConfigError, SpecError
from nodrop.listeners.spec import ListenerSpec, parse_spec
from nodrop.supervisor.priority import StartupPriority, parse_startup_priority

DEFAULT_WORKERS = 1
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_DRAIN_SIGNAL = signal.SIGTERM
DEFAULT_READY_GRACE = 0.5
"""After every new worker said READY=1, how long they must stay up before the
old generation is told to drain: a version that crashes right after start-up
is rolled back, not left to crash-loop with the old one gone."""
DEFAULT_MAX_DRAINING = 4
"""Generations allowed to drain at once; past it the oldest is killed."""
DEFAULT_RESTART_BACKOFF = (0.1, 10.0)
"""A crashed worker is restarted after 0.1 s, doubling to at most 10 s."""


class ReadyMode(enum.Enum):
    NOTIFY = "notify"
    DELAY = "delay"


class Strategy(enum.Enum):
    INHERIT = "inherit"
    """The supervisor binds once and passes the same sockets to every generation."""
    REUSEPORT = "reuseport"
    """Each generation gets fresh SO_REUSEPORT listeners; the kernel migrates."""


@dataclass(frozen=True)
class Readiness:
    mode: ReadyMode = ReadyMode.NOTIFY
    delay: float = 0.0

    def __str__(self) -> str:
        return "notify" if self.mode is ReadyMode.NOTIFY else f"delay:{self.delay:g}"


def parse_ready(text: str) -> Readiness:
    """``notify`` or ``delay:SECONDS``."""
    if text == "notify":
        return Readiness()
    kind, sep, value = text.partition(":")
    if kind == "delay" and sep:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if 0 <= seconds < math.inf:  # nan fails both
            return Readiness(ReadyMode.DELAY, seconds)
    raise ConfigError(f"--ready {text!r}: expected 'notify' or 'delay:SECONDS' (e.g. delay:1.5)")


def parse_signal(text: str | int) -> signal.Signals:
    """``SIGTERM``, ``TERM``, ``term`` or ``15``."""
    if isinstance(text, int) or text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise ConfigError(f"no signal number {text}") from None
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(f"unknown signal {text!r}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything one generation is started from."""

    command: tuple[str, ...] = ()
    listen: tuple[ListenerSpec, ...] = ()
    workers: int = DEFAULT_WORKERS
    ready: Readiness = field(default_factory=Readiness)
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    ready_grace: float = DEFAULT_READY_GRACE
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    drain_signal: signal.Signals = DEFAULT_DRAIN_SIGNAL
    strategy: Strategy = Strategy.INHERIT
    max_draining: int = DEFAULT_MAX_DRAINING
    env: tuple[tuple[str, str], ...] = ()
    allow_sysctl: bool = False
    startup_priority: StartupPriority = StartupPriority.NORMAL
    """New workers' CPU priority until READY=1 (:mod:`.priority`)."""
    chdir: str | None = None
    """Each generation's working directory. Symlinks in it are resolved when
    the generation starts (not when the supervisor does), so flipping a
    ``current -> releases/N`` link and reloading runs release N."""

    def validate(self) -> RunConfig:
        if not self.command:
            raise ConfigError("no command to run: give it after `--` or as `command` in the config")
        if not 1 <= self.workers <= 1024:
            raise ConfigError(f"workers must be between 1 and 1024, not {self.workers}")
        # Written so that nan fails: every comparison with it is false.
        for name in ("ready_timeout", "drain_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be a finite number of seconds more than 0"
                )
        if not 0 <= self.ready_grace < math.inf:
            raise ConfigError("ready-grace must be a finite number of seconds, 0 or more")
        if self.max_draining < 1:
            raise ConfigError("max-draining must be at least 1")
        return self


_FILE_KEYS = {
    "command",
    "listen",
    "workers",
    "ready",
    "ready_timeout",
    "ready_grace",
    "drain_timeout",
    "drain_signal",
    "strategy",
    "max_draining",
    "env",
    "chdir",
    "startup_priority",
}


def _expect(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"config key {key!r}: expected {what}, got {value!r}")
    return value


def parse_config_text(text: str, source: str = "config") -> dict[str, Any]:
    """Parse a TOML config into RunConfig field values (pure).

    Raises:
        ConfigError: naming the file and the key.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)} (known: {sorted(_FILE_KEYS)})")
    out: dict[str, Any] = {}
    try:
        if "command" in data:
            cmd = data["command"]
            if isinstance(cmd, str):
                raise ConfigError(
                    f'{source}: command must be a list of strings, e.g. ["app", "--port", "8000"]'
                )
            _expect("command", cmd, list, "a list of strings")
            out["command"] = tuple(_expect("command", c, str, "strings") for c in cmd)
        if "listen" in data:
            specs = _expect("listen", data["listen"], list, "a list of listener specs")
            out["listen"] = tuple(
                parse_spec(_expect("listen", s, str, "a spec string"), os.getcwd()) for s in specs
            )
        if "workers" in data:
            out["workers"] = _expect("workers", data["workers"], int, "a whole number")
        if "ready" in data:
            out["ready"] = parse_ready(
                _expect("ready", data["ready"], str, "'notify' or 'delay:S'")
            )
        for key in ("ready_timeout", "ready_grace", "drain_timeout"):
            if key in data:
                out[key] = float(_expect(key, data[key], (int, float), "seconds"))
        if "drain_signal" in data:
            out["drain_signal"] = parse_signal(
                _expect("drain_signal", data["drain_signal"], (str, int), "a signal")
            )
        if "strategy" in data:
            out["strategy"] = parse_strategy(
                _expect("strategy", data["strategy"], str, "a strategy")
            )
        if "max_draining" in data:
            out["max_draining"] = _expect(
                "max_draining", data["max_draining"], int, "a whole number"
            )
        if "chdir" in data:
            out["chdir"] = _expect("chdir", data["chdir"], str, "a directory")
        if "startup_priority" in data:
            text = _expect("startup_priority", data["startup_priority"], str, "a priority")
            try:
                out["startup_priority"] = parse_startup_priority(text)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if "env" in data:
            env = _expect("env", data["env"], dict, "a table")
            out["env"] = tuple(
                (str(k), _expect(f"env.{k}", v, str, "a string")) for k, v in env.items()
            )
    except SpecError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from exc
    return out


def parse_strategy(text: str) -> Strategy:
    try:
        return Strategy(text)
    except ValueError:
        raise ConfigError(f"strategy {text!r}: expected 'inherit' or 'reuseport'") from None


def load_config(path: str | None, cli: Mapping[str, Any]) -> RunConfig:
    """Build the config: defaults, then the file (if any), then explicit CLI values.

    Raises:
        ConfigError: unreadable or invalid file, invalid result.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        values.update(parse_config_text(text, path))
    known = {f.name for f in fields(RunConfig)}
    values.update({k: v for k, v in cli.items() if k in known and v is not None})
    return RunConfig(**values).validate()


def worker_env(config: RunConfig, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a worker starts with (before activation variables)."""
    env = {
        k: v
        for k, v in base.items()
        if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    }
    env.update(dict(config.env))
    return env


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """JSON-able form (for `nodrop reexec`); inverse of :func:`config_from_dict`."""
    return {
        "command": list(config.command),
        "listen": [spec.text or str(spec) for spec in config.listen],
        "workers": config.workers,
        "ready": str(config.ready),
        "ready_timeout": config.ready_timeout,
        "ready_grace": config.ready_grace,
        "drain_timeout": config.drain_timeout,
        "drain_signal": int(config.drain_signal),
        "strategy": config.strategy.value,
        "max_draining": config.max_draining,
        "env": [list(pair) for pair in config.env],
        "allow_sysctl": config.allow_sysctl,
        "chdir": config.chdir,
        "startup_priority": config.startup_priority.value,
    }


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return RunConfig(
        command=tuple(data["command"]),
        listen=tuple(parse_spec(text) for text in data["listen"]),
        workers=data["workers"],
        ready=parse_ready(data["ready"]),
        ready_timeout=data["ready_timeout"],
        ready_grace=data["ready_grace"],
        drain_timeout=data["drain_timeout"],
        drain_signal=signal.Signals(data["drain_signal"]),
        strategy=Strategy(data["strategy"]),
        max_draining=data["max_draining"],
        env=tuple((k, v) for k, v in data["env"]),
        allow_sysctl=data["allow_sysctl"],
        chdir=data.get("chdir"),
        startup_priority=StartupPriority(data.get("startup_priority", "normal")),
    )
