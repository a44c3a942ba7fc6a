"""The guest agent's event stream: JSON lines, one object per line, read in one place.

The host side of the virtio-serial port is a plain file that QEMU appends to while the guest
runs. A power cut can leave the last line truncated (no newline after it); such a line is not
an event (the oracle treats the op it would have described as never seen) and is skipped. Any
other line that is not one JSON object is corruption of the record the verdict rests on: an
EventStreamError (a testbed failure), never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class EventStreamError(ValueError):
    """A line of the event stream other than a truncated last one is not a JSON object."""


def _event(line: bytes, source: str, number: int) -> Event:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise EventStreamError(f"{source}:{number}: corrupt event line: {line[:120]!r}")
    return event


def parse(data: bytes, source: str = "events") -> list[Event]:
    """Every event of `data`: each newline-terminated line must be a JSON object; a last line
    without its newline is an event if it is whole, else the cut truncated it and it is
    skipped."""
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when data ends with a newline
    events = [_event(line, source, n) for n, line in enumerate(lines, 1)]
    if last:
        try:
            events.append(_event(last, source, len(lines) + 1))
        except EventStreamError:
            pass  # truncated by the cut
    return events


def read(path: str | Path) -> list[Event]:
    return parse(Path(path).read_bytes(), str(path))


class Tail:
    """Reads the complete lines appended to a file since the previous call (from `offset`)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self.lines = 0

    def new(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        lines = data[:end - 1].split(b"\n") if end else []
        events = [_event(line, str(self.path), self.lines + n) for n, line in enumerate(lines, 1)]
        self.offset += end
        self.lines += len(events)
        return events


def save_round(src: Path, start: int, dst: Path) -> int:
    """Copy the round's part of `src`, the bytes from `start` to its end now (the power is off:
    nothing more comes), to `dst`; return that end, where the next round on the same port
    begins. Split by position, not by line: with restart `reset` one file spans every round,
    and a line the cut truncated is followed directly by the next round's first line."""
    with open(src, "rb") if src.exists() else open(os.devnull, "rb") as f:
        f.seek(start)
        data = f.read()
    dst.write_bytes(data)
    return start + len(data)
