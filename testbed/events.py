"""The guest agent's event stream: JSON lines, one object per line, read in one place.

The host side of the virtio-serial port is a plain file that QEMU appends to while the guest
runs. A power cut can leave the last line truncated; such a line is not an event (the oracle
treats the op it would have described as never seen) and is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Event = dict[str, Any]


def parse(data: bytes) -> list[Event]:
    """Every complete, well-formed JSON object line of `data`."""
    events = []
    for line in data.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def read(path: str | Path) -> list[Event]:
    return parse(Path(path).read_bytes())


class Tail:
    """Reads the complete lines appended to a file since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return parse(data[:end])


def save_round(src: Path, epoch: int, dst: Path) -> None:
    """Copy round `epoch`'s lines of `src` to `dst` (with cut mode reset one file spans every
    round); a line the cut truncated is kept as evidence (readers skip it)."""
    keep = []
    for line in src.read_bytes().splitlines(keepends=True) if src.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            keep.append(line)
            continue
        if isinstance(event, dict) and event.get("epoch") == epoch:
            keep.append(line)
    dst.write_bytes(b"".join(keep))
