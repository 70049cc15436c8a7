"""Every wire parser under hypothesis, at scale (issue 13, item 5).

Each target in :mod:`nodrop.testing.fuzz` is fed raw bytes and, to reach
past the JSON and ``KEY=VALUE`` layers, structured messages built from the
fields the parser looks at, with hostile values (nan, inf, huge and negative
numbers, wrong types, deep nesting). The corpus the coverage-guided fuzzer
keeps (benchmarks/fuzz_corpus/) is replayed too, and a short atheris run is
a test of its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodrop.testing.fuzz import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "fuzz_corpus"
EXAMPLES = 1000
SCALE = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 253, 254, 2**31, math.nan, math.inf, -math.inf, True, False]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=8,
)
names = st.one_of(st.text(max_size=300), st.sampled_from(["web", "", ":", "a" * 256, "x\n"]))
identity = st.one_of(
    st.lists(scalars, max_size=8),
    st.tuples(
        st.sampled_from([2, 10, 1, -1, 70000]),
        st.sampled_from([1, 2, 5]),
        st.sampled_from([0, 6, 17]),
        st.integers(-1, 5),
        st.sampled_from(["inet", "inet6", "unix", "abstract", "x", 3]),
        scalars,
        scalars,
        scalars,
    ).map(list),
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def prefixed(body: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Two leading bytes that the targets read as small numbers (fd counts, batch sizes)."""
    return st.tuples(st.binary(min_size=2, max_size=2), body).map(lambda t: t[0] + t[1])


def message(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """A JSON object with some of ``fields`` and a few stray keys."""
    return st.fixed_dictionaries(
        {}, optional={**fields, "stray": json_values, "v": st.sampled_from([1, 2, "1", None])}
    ).map(dumps)


STRUCTURED: dict[str, st.SearchStrategy[bytes]] = {
    "control_request": st.tuples(
        message(
            {
                "cmd": st.sampled_from(["reload", "status", "stop", "reexec", "x", 1, None]),
                "wait": st.sampled_from(["ready", "drained", "", None, 1]),
            }
        ),
        st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]),
    ).map(lambda t: t[0] + t[1]),
    "fdwire_manifest": prefixed(
        st.fixed_dictionaries(
            {"v": st.just(1), "op": st.sampled_from(["fds", "ok", "x"])},
            optional={
                "total": numbers,
                "offset": numbers,
                "fds": st.lists(
                    st.tuples(names, identity).map(lambda t: [t[0], *t[1]]), max_size=5
                ),
                "meta": json_values,
            },
        ).map(dumps)
    ),
    "notify_datagram": st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "READY",
                    "STATUS",
                    "STOPPING",
                    "FDSTORE",
                    "FDNAME",
                    "FDSTORETTL",
                    "FDSTOREREMOVE",
                    "MAINPID",
                    "ready",
                    "X-Y",
                    "",
                    "A B",
                ]
            ),
            st.one_of(
                st.sampled_from(["1", "0", "nan", "inf", "-inf", "1e400", "-1", "web", ""]),
                st.text(max_size=30),
            ),
            st.sampled_from(["=", "", "=="]),
        ).map(lambda t: f"{t[0]}{t[2]}{t[1]}"),
        max_size=8,
    ).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    "holder_op": st.fixed_dictionaries(
        {"v": st.just(1), "op": st.sampled_from(["deposit", "claim", "list", "release", "x"])},
        optional={
            "ttl": numbers,
            "all": json_values,
            "names": st.one_of(st.lists(names, max_size=5), json_values),
            "ids": st.one_of(st.lists(numbers, max_size=5), json_values),
            "match": st.lists(identity, max_size=3),
        },
    ).map(dumps),
    "connhandoff_message": prefixed(
        st.fixed_dictionaries(
            {"v": st.just(1), "op": st.sampled_from(["ok", "register", "give", "x"])},
            optional={
                "placed": numbers,
                "closed": numbers,
                "returned": st.lists(numbers, max_size=6),
                "room": numbers,
                "meta": st.fixed_dictionaries(
                    {},
                    optional={
                        "states": st.one_of(
                            st.lists(
                                st.one_of(
                                    st.text(max_size=20), st.sampled_from(["", "AA==", "%%"])
                                ),
                                max_size=6,
                            ),
                            json_values,
                        )
                    },
                ),
            },
        ).map(dumps)
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_raw_bytes(name: str) -> None:
    target = TARGETS[name]

    @SCALE
    @given(st.one_of(st.binary(max_size=4096), st.binary(max_size=8).map(lambda b: b * 600)))
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_structured(name: str) -> None:
    target = TARGETS[name]

    @SCALE
    @given(STRUCTURED[name])
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_deep_nesting_and_oversize(name: str) -> None:
    """Inputs hypothesis rarely builds: 100,000 nested brackets, 1 MiB."""
    for data in (b"[" * 100_000, b'{"a":' * 50_000, b"x" * (1 << 20), b"\0" * 70_000):
        TARGETS[name](data)
        TARGETS[name](b"\0\0" + data)


def test_corpus_replays() -> None:
    """Every input the coverage-guided fuzzer kept still passes its target."""
    seen = 0
    for name, target in TARGETS.items():
        for path in sorted((CORPUS / name).iterdir()):
            if path.name.startswith("."):
                continue
            target(path.read_bytes())
            seen += 1
    assert seen >= len(TARGETS), "the corpus is empty"


@pytest.mark.slow
def test_atheris_smoke_run() -> None:
    """benchmarks/fuzz.py runs every target coverage-guided for a few thousand
    inputs (skips, saying why, where atheris is not installed)."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    for name in sorted(TARGETS):
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "fuzz.py"),
                name,
                "--runs",
                "2000",
                "--no-save",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "Done 2000 runs" in result.stderr, result.stderr[-2000:]
