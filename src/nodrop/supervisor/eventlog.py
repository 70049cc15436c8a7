"""The supervisor's log: one line per event, as text or as JSON.

Text (the default) is for people and the journal::

    nodrop[4242]: reload: generation 3 ready; generation 2 draining

``--log-format json`` writes one JSON object per line for log pipelines,
with the same message and the event's fields::

    {"time": "2026-01-02T03:04:05.678Z", "pid": 4242, "level": "info",
     "event": "reload", "message": "...", "data": {"ok": true, "generation": 3, ...}}

Workers' own output is not rewritten: it keeps its ``[gN.wI]`` prefix.

A line that cannot be written (a full disk...) is dropped and counted, never
raised into the code that logs it (:mod:`.logsink`).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any, TextIO

from nodrop.supervisor.logsink import sink_for

LOG_FORMATS = ("text", "json")


class EventLog:
    def __init__(self, stream: TextIO, fmt: str = "text") -> None:
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r}: expected one of {LOG_FORMATS}")
        self.stream = stream
        self.sink = sink_for(stream)
        self.fmt = fmt

    def event(
        self,
        event: str,
        message: str,
        level: str = "info",
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        """One line: ``message`` as text, or an object with ``fields`` as JSON
        (under ``data``, so that no field can clobber the line's own keys)."""
        if self.fmt == "json":
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            record = {
                "time": stamp.replace("+00:00", "Z"),
                "pid": os.getpid(),
                "level": level,
                "event": event,
                "message": message,
            }
            if fields:
                record["data"] = dict(fields)
            line = json.dumps(record, default=str)
        else:
            prefix = "warning: " if level == "warning" else ""
            line = f"nodrop[{os.getpid()}]: {prefix}{message}"
        self.sink.write(f"{line}\n".encode(errors="replace"))
