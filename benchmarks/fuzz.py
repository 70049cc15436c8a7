#!/usr/bin/env python3
"""Coverage-guided fuzzing of nodrop's wire parsers with atheris (libFuzzer).

usage: python benchmarks/fuzz.py TARGET [--runs N | --max-time S] [--no-save]
       python benchmarks/fuzz.py --list

TARGET is one of nodrop.testing.fuzz.TARGETS: control_request,
fdwire_manifest, notify_datagram, holder_op, connhandoff_message. Each
takes raw bytes and may only raise its parser's own ProtocolError or
ControlError; anything else is a crash, saved under
benchmarks/fuzz_corpus/crashes/ with the input that caused it.

The corpus lives in benchmarks/fuzz_corpus/TARGET/ and is kept in the
repository: inputs that reach new code are added to it (unless --no-save,
which fuzzes a temporary copy). tests/test_fuzz.py replays it and runs a
short smoke run of every target.

Needs atheris (`pip install atheris`, in the test extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz_corpus")
sys.path.insert(0, os.path.join(HERE, "..", "src"))

with atheris.instrument_imports(include=["nodrop"]):
    from nodrop.testing.fuzz import TARGETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS))
    parser.add_argument("--list", action="store_true", help="print the targets")
    parser.add_argument("--runs", type=int, help="stop after N inputs")
    parser.add_argument("--max-time", type=int, help="stop after S seconds")
    parser.add_argument("--no-save", action="store_true", help="fuzz a copy of the corpus")
    parser.add_argument("--work", help=argparse.SUPPRESS)  # set for the child (see below)
    args = parser.parse_args()
    if args.list or args.target is None:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.work is None:
        # libFuzzer ends the process with exit(): no `finally` would run. So
        # the fuzzing runs in a child, and this process cleans up after it.
        work = tempfile.mkdtemp(prefix=f"nodrop-fuzz-{args.target}-")
        try:
            return subprocess.call([sys.executable, *sys.argv, "--work", work])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return fuzz(args)


def fuzz(args: argparse.Namespace) -> int:
    corpus = os.path.join(CORPUS, args.target)
    crashes = os.path.join(CORPUS, "crashes")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    libfuzzer = [sys.argv[0], "-max_len=70000", "-timeout=10", "-rss_limit_mb=1024"]
    libfuzzer.append(f"-artifact_prefix={crashes}/{args.target}-")
    if args.runs is not None:
        libfuzzer.append(f"-runs={args.runs}")
    if args.max_time is not None:
        libfuzzer.append(f"-max_total_time={args.max_time}")
    if args.no_save:
        copy = os.path.join(args.work, "corpus")
        shutil.copytree(corpus, copy)
        libfuzzer.append(copy)
    else:
        libfuzzer.append(corpus)
    atheris.Setup(libfuzzer, TARGETS[args.target])
    atheris.Fuzz()  # ends the process: status 0 when done, non-zero on a crash
    return 0


if __name__ == "__main__":
    sys.exit(main())
