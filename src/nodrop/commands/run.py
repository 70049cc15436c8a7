"""``nodrop run``: start a server under the supervisor."""

from __future__ import annotations

import argparse
import os
from typing import Any

from nodrop.commands._numbers import positive_seconds, seconds
from nodrop.errors import ConfigError

HELP = """\
Start CMD as generation 1 with the listening sockets passed systemd-style
(fds 3.., LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID) and a NOTIFY_SOCKET to say
READY=1 on. `nodrop reload` (or SIGHUP) starts the next generation and drains
the old one only when every new worker is ready; if the new one fails, it is
killed and the old one keeps serving.

With the default inherit strategy the supervisor binds the listeners once and
keeps them for its whole life, so no connection is refused or reset between
generations. With --strategy reuseport each generation gets fresh SO_REUSEPORT
listeners (options and addresses may change on every reload) and the kernel
migrates the old generation's queued connections (see `nodrop doctor`). Either
way the supervisor never touches the data path: workers accept on the sockets
themselves.
"""

EPILOG = """\
examples:
  nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.uvicorn app:app
  nodrop run --listen tcp://0.0.0.0:8000 -- \
      gunicorn -c python:nodrop.adapters.gunicorn -k uvicorn_worker.UvicornWorker app:app
  nodrop run --listen 'tcp://[::]:8000?name=web' --workers 4 -- ./server
  nodrop run --listen tcp://127.0.0.1:8000 --ready delay:2 -- python -m http.server --help
  nodrop run --config /etc/myapp/nodrop.toml

signals: HUP reload, TERM/INT graceful stop (twice: kill now), USR1 forwarded to the
active workers.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a server; reload it with no dropped connection",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        "-l",
        action="append",
        metavar="SPEC",
        help="listener: tcp://HOST:PORT, udp://HOST:PORT, unix:/path or unix:@name, with "
        "options like ?name=web&backlog=4096 (repeatable; see docs/deployment.md)",
    )
    parser.add_argument(
        "--workers", "-w", type=int, help="worker processes per generation (default 1)"
    )
    parser.add_argument(
        "--ready",
        metavar="notify|delay:S",
        help="when a worker counts as ready: when it sends READY=1 (default), or S seconds "
        "after it started (for servers that cannot notify)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=positive_seconds,
        metavar="S",
        help="roll back a generation not ready within S seconds (default 30)",
    )
    parser.add_argument(
        "--ready-grace",
        type=seconds,
        metavar="S",
        help="new workers must stay up S seconds after READY=1 before the old generation "
        "drains; a crash in that window rolls back (default 0.5)",
    )
    parser.add_argument(
        "--startup-priority",
        choices=("normal", "low", "idle"),
        help="CPU priority of new workers until they say READY=1, so that a reload's start-up "
        "takes less CPU from the workers serving: normal (default), low (nice +10) or idle "
        "(SCHED_IDLE); restored on READY=1 (needs CAP_SYS_NICE or RLIMIT_NICE, else a warning)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=positive_seconds,
        metavar="S",
        help="SIGKILL an old generation still running S seconds after the drain signal (default 30)",
    )
    parser.add_argument(
        "--drain-signal",
        metavar="SIG",
        help="signal that tells an old generation to finish and exit (default SIGTERM)",
    )
    parser.add_argument(
        "--max-draining",
        type=int,
        metavar="N",
        help="generations allowed to drain at once; past it the oldest is killed (default 4)",
    )
    parser.add_argument(
        "--strategy",
        choices=["inherit", "reuseport"],
        help="how listeners reach generations (default inherit; see `nodrop doctor`)",
    )
    parser.add_argument(
        "--allow-sysctl",
        action="store_true",
        default=None,
        help="reuseport strategy: allow setting net.ipv4.tcp_migrate_req=1 when eBPF is unavailable",
    )
    parser.add_argument(
        "--chdir",
        metavar="DIR",
        help="run each generation in DIR, resolving symlinks when the generation starts: "
        "with --chdir /srv/app/current, flip the link and reload to run the new release",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="this app's name: its control socket is NAME.sock in the control directory "
        "($XDG_RUNTIME_DIR/nodrop, /run/nodrop for root, else /tmp/nodrop-UID); default: "
        "from the listeners, e.g. tcp-0.0.0.0-8000, so two apps need no extra flag",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="control socket path (default: from --name, see above; or $NODROP_CONTROL)",
    )
    parser.add_argument(
        "--metrics",
        metavar="tcp://HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (reloads by outcome, "
        "durations, workers, accept queues, connection ledger); bind it to loopback or a "
        "private address. `nodrop status --format prometheus` prints the same",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="the supervisor's own log lines: text (default) or one JSON object per line "
        "(reloads and their ledgers with all their fields)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with the same settings, re-read on every reload"
    )
    parser.add_argument(
        "--no-tag-output",
        action="store_true",
        help="pass workers' stdout/stderr straight through instead of prefixing [gN.wI]",
    )
    parser.add_argument(
        "--handoff",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hand the draining workers' idle keep-alive connections to the new generation "
        "through the connection broker ($NODROP_HANDOFF), so reloads close no connection "
        "(default: on; servers that do not take part are served as with --no-handoff; "
        "--handoff warns when they do not; see docs/keepalive.md)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    parser.set_defaults(func=run)


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given explicitly on the command line."""
    from nodrop.listeners.spec import parse_spec
    from nodrop.supervisor.config import parse_ready, parse_signal, parse_strategy
    from nodrop.supervisor.priority import parse_startup_priority

    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    values: dict[str, Any] = {
        "command": tuple(command) or None,
        "listen": tuple(parse_spec(s, os.getcwd()) for s in args.listen) if args.listen else None,
        "workers": args.workers,
        "ready": parse_ready(args.ready) if args.ready else None,
        "ready_timeout": args.ready_timeout,
        "ready_grace": args.ready_grace,
        "drain_timeout": args.drain_timeout,
        "drain_signal": parse_signal(args.drain_signal) if args.drain_signal else None,
        "max_draining": args.max_draining,
        "strategy": parse_strategy(args.strategy) if args.strategy else None,
        "allow_sysctl": args.allow_sysctl,
        "chdir": args.chdir,
        "startup_priority": parse_startup_priority(args.startup_priority)
        if args.startup_priority
        else None,
    }
    return {k: v for k, v in values.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from nodrop.connhandoff.broker import ConnectionBroker
    from nodrop.listeners.held import HeldSocket
    from nodrop.supervisor.config import config_from_dict, load_config
    from nodrop.supervisor.control import default_control_path, prepare_control_dir
    from nodrop.supervisor.discovery import check_name, derive_name
    from nodrop.supervisor.logsink import say
    from nodrop.supervisor.metrics_http import MetricsServer, bind_metrics
    from nodrop.supervisor.process import become_subreaper
    from nodrop.supervisor.reexec import load_state, restore
    from nodrop.supervisor.strategies import make_listeners
    from nodrop.supervisor.supervisor import Supervisor, run_supervisor
    from nodrop.supervisor.takeover import Recovery, take_over
    from nodrop.systemd.activation import listen_fds

    values = cli_values(args)
    state = load_state()
    if state is not None:  # we are `nodrop reexec`'s new program
        restored, resume = restore(state, log=lambda m: say(f"nodrop: {m}"))
        broker_state = state["broker"]
        supervisor = Supervisor(
            config_from_dict(state["config"]),
            restored,
            control_path=state["control"]["path"],
            config_path=args.config,
            cli_values=values,
            tag_output=not args.no_tag_output,
            service_notify_socket=state["service_notify"],
            resume=resume,
            name=os.path.basename(state["control"]["path"]).removesuffix(".sock"),
            log_format=args.log_format,
            metrics_server=MetricsServer(bind_metrics(args.metrics)) if args.metrics else None,
            broker=None if broker_state is None else ConnectionBroker.from_state(broker_state),
            recovery=Recovery(state["control"]["path"]),
        )
        os.environ.pop("NOTIFY_SOCKET", None)
        become_subreaper()
        return run_supervisor(supervisor)
    config = load_config(args.config, values)
    # Our own service manager may hand us listeners (systemd .socket units):
    # they are kept and passed to every generation.
    inherited = [HeldSocket.adopt(s.socket, s.name) for s in listen_fds(unset_environment=True)]
    if not config.listen and not inherited:
        raise ConfigError("nothing to listen on: give --listen SPEC (or `listen` in the config)")
    name = (
        check_name(args.name)
        if args.name
        else derive_name(
            config.listen, [str(h.identity).partition(" (")[0] for h in inherited], os.getpid()
        )
    )
    control = args.control or default_control_path(name)
    prepare_control_dir(control)  # a bad path is refused before anything starts
    service_notify = os.environ.pop("NOTIFY_SOCKET", None)
    become_subreaper()
    listeners = make_listeners(config, inherited, log=lambda m: say(f"nodrop: {m}"))
    recovery = take_over(control, listeners)  # a killed predecessor's workers, if any
    supervisor = Supervisor(
        config,
        listeners,
        control_path=control,
        recovery=recovery,
        config_path=args.config,
        cli_values=values,
        tag_output=not args.no_tag_output,
        service_notify_socket=service_notify,
        broker=None
        if args.handoff is False
        else ConnectionBroker.in_private_dir(requested=args.handoff is True),
        name=name,
        log_format=args.log_format,
        metrics_server=MetricsServer(bind_metrics(args.metrics)) if args.metrics else None,
    )
    return run_supervisor(supervisor)
