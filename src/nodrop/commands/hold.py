"""``nodrop hold``: keep deposited listening sockets open between two servers."""

from __future__ import annotations

import argparse
import errno
import signal
from typing import Any

from nodrop.commands._numbers import positive_seconds


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from exc
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "hold",
        help="hold deposited sockets until a successor claims them (or a TTL ends)",
        description=(
            "Run a socket holder: servers deposit their listening sockets here "
            "with a time-to-live and exit; their successor claims them. While a "
            "socket is held the kernel keeps queueing connections, so a "
            "stop-then-start restart refuses none. Sockets nobody claims are "
            "closed when their TTL ends. Also accepts systemd fd-store datagrams "
            "(FDSTORE=1, FDNAME=, FDSTOREREMOVE=1) with --fdstore."
        ),
    )
    parser.add_argument("--path", required=True, help="the holder's socket (absolute, or @name)")
    parser.add_argument(
        "--mode", type=_mode, default=0o600, help="file mode of the socket (default 0600)"
    )
    parser.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also let this uid deposit and claim (repeatable; our own uid always may)",
    )
    parser.add_argument(
        "--allow-abstract",
        action="store_true",
        help="accept an @abstract path (it has no file permissions; only the uid check)",
    )
    parser.add_argument(
        "--ttl", type=positive_seconds, default=None, help="default time-to-live, seconds (30)"
    )
    parser.add_argument(
        "--ttl-max", type=positive_seconds, default=None, help="longest time-to-live granted (3600)"
    )
    parser.add_argument(
        "--max-held", type=int, default=None, help="most sockets held at once (4096)"
    )
    parser.add_argument(
        "--fdstore", metavar="PATH", default=None, help="also accept FDSTORE=1 datagrams here"
    )
    parser.add_argument(
        "--exit-when-empty",
        action="store_true",
        help="exit once nothing is held (how on-demand holders run)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodrop.errors import HolderError
    from nodrop.holder import ops
    from nodrop.holder.config import HolderConfig
    from nodrop.holder.daemon import Holder
    from nodrop.systemd.notify import notify

    ttl_max = args.ttl_max if args.ttl_max is not None else ops.DEFAULT_TTL_MAX
    ttl = args.ttl if args.ttl is not None else min(ops.DEFAULT_TTL, ttl_max)
    if ttl > ttl_max:
        raise HolderError(f"--ttl {ttl:g} exceeds --ttl-max {ttl_max:g}")
    config = HolderConfig(
        path=args.path,
        mode=args.mode,
        allowed_uids=frozenset(args.allow_uid),
        allow_abstract=args.allow_abstract,
        ttl_default=ttl,
        ttl_max=ttl_max,
        max_held=args.max_held if args.max_held is not None else ops.DEFAULT_MAX_HELD,
        fdstore_path=args.fdstore,
        exit_when_empty=args.exit_when_empty,
    )
    holder = Holder(config)
    try:
        holder.open()
    except HolderError as exc:
        # Tell whoever started us on demand (or systemd) why, then fail.
        code = errno.EADDRINUSE if "already listens" in str(exc) else errno.EINVAL
        notify({"STATUS": str(exc)[:200], "ERRNO": str(code)}, unset_environment=True)
        holder.close()
        raise
    with holder:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: holder.stop())
        notify({"READY": "1", "STATUS": f"holding at {args.path}"}, unset_environment=True)
        holder.serve()
    return 0
