"""Numeric option types shared by the subcommands.

``float("nan")`` and ``float("inf")`` parse, and every comparison with nan
is false: a ``--ready-timeout nan`` used to disable rollback silently and a
``--drain-timeout nan`` SIGKILLed the old generation at once. Every option
given in seconds goes through one of these.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds, 0 or more."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds cannot be negative")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds, more than 0 (where 0 would mean nothing)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be more than 0")
    return value
