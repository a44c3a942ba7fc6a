"""The guest agent's event stream: JSON lines, one object per line, read in one place.

The host side of the virtio-serial port is a plain file that QEMU appends to while the guest
runs. A power cut can leave the last line truncated (no newline after it); such a line is not
an event (the oracle treats the op it would have described as never seen) and is skipped. Any
other line that is not one JSON object is corruption of the record the verdict rests on: an
EventStreamError (a testbed failure), never silently dropped.
"""

from __future__ import annotations

import json
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
    """Reads the complete lines appended to a file since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
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


def save_round(src: Path, epoch: int, dst: Path) -> None:
    """Copy round `epoch`'s lines of `src` to `dst` (with cut mode reset one file spans every
    round); a line that is not a JSON object is kept as evidence: readers skip it as the cut's
    truncation if it is the last one, without its newline, and report it as corruption
    otherwise."""
    data = src.read_bytes() if src.exists() else b""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]  # what follows the last newline: b"" or a truncated line
    keep = []
    for line in lines:
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("epoch") == epoch:
            keep.append(line)
    dst.write_bytes(b"".join(keep))
