"""Cuts at a chosen step: BTT8 operations driven through btt8.steps, one thread held at a label.

The host's `at_step` config, {"label": L, "thread": T or null (any), "nth": n, "hold_s": s}:
the nth arrival at label L (of thread T, or of any thread, counted over the round) writes a
`pause` event and holds that thread right there, before the step runs, while the other threads
go on; the host cuts the power when it reads the event. The hold ends only if no cut came within
hold_s (the host failed; a `released` event says so and the op completes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from typing import Any

Emit = Callable[[dict[str, Any]], None]


class StepTrap:
    def __init__(self, spec: dict[str, Any], emit: Emit) -> None:
        self.label, self.thread = spec["label"], spec.get("thread")
        self.nth, self.hold_s = int(spec["nth"]), float(spec["hold_s"])
        self.emit = emit
        self.arrivals = 0
        self.lock = threading.Lock()

    def drive(self, steps: Generator[str, None, Any], base: dict[str, Any]) -> Any:
        """Run a step generator to its end, holding at the trap; its return value. base: the
        op's identity (epoch, thread, op, kind, lba) for the pause event."""
        try:
            label = next(steps)
            while True:
                if label == self.label and self.thread in (None, base["thread"]):
                    self._arrive(base)
                label = next(steps)
        except StopIteration as done:
            return done.value

    def _arrive(self, base: dict[str, Any]) -> None:
        with self.lock:
            self.arrivals += 1
            if self.arrivals != self.nth:
                return
        self.emit({"ev": "pause", "t": time.monotonic_ns(), **base, "label": self.label,
                   "nth": self.nth})
        time.sleep(self.hold_s)  # the power cut ends this
        self.emit({"ev": "released", "t": time.monotonic_ns(), **base, "label": self.label})

    def apply(self, pool: Any, kind: str, lba: int, data: bytes,
              base: dict[str, Any]) -> bytes | None:
        """One workload op on a btt8 Pool through its steps (read, write, or zero)."""
        from btt8.steps import read_steps, write_steps

        if kind == "read":
            buf = bytearray(pool.bsize)
            self.drive(read_steps(pool, lba, buf), base)
            return bytes(buf)
        self.drive(write_steps(pool, lba, data if kind == "write" else None), base)
        return None
