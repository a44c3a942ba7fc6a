"""Test helpers: a backend that separates visible from durable bytes, lane pinning, hashing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import btt8
from btt8.pmem import MemoryPmem

MIB = 1 << 20


class DurablePmem(MemoryPmem):
    """Visible bytes plus a durable copy that only persist()/store_persist() update (by cache
    line), so a test can cut power and see exactly what a missing flush would lose."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.durable = bytearray(size)
        self.persists: list[tuple[int, int]] = []

    def persist(self, off: int, n: int) -> None:
        # Flushes work on whole 64-byte cache lines, like clwb / pmem_persist.
        self.persists.append((off, n))
        start, end = off & ~63, (off + n + 63) & ~63
        self.durable[start:end] = self._buf[start:end]

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.store(off, data)
        self.persist(off, len(data))

    def after_power_cut(self) -> MemoryPmem:
        pmem = MemoryPmem(self.size)
        pmem.store(0, self.durable)
        return pmem


def pin_home_lane(pool: btt8.Pool, lane: int) -> None:
    """Make the calling thread's writes go through `lane` (tests need deterministic lanes)."""
    pool._home_lane[threading.get_ident()] = lane


def table_entries(pool: btt8.Pool) -> list[tuple[int, int]]:
    """(cycle, PBA-with-flags) for every LBA, read through the pool's backend."""
    load8, word = pool._pmem.load8, pool._tt_word
    return [(load8(word + 2 * i), load8(word + 2 * i + 1)) for i in range(pool.nblock)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
