"""recover() (byte-plane tricks, no per-entry Python loop) against a plain per-entry reference;
btt8.check()."""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import btt8
import pytest
from btt8.core import (
    ENTRY_SIZE,
    FLAG_UNUSED,
    FLAG_ZERO,
    LANE_MASK,
    NFREE,
    NFREE_SHIFT,
    PBA_MASK,
    CorruptionError,
    Layout,
    initial_table,
    recover,
)
from btt8.pmem import MemoryPmem
from btt8_helpers import MIB, pin_home_lane, sha

LAY = Layout.for_pool(512, 16 * MIB)  # 27678 LBAs


def reference_recover(table: bytes, lay: Layout) -> tuple[list[int], list[int]]:
    """Recovery as the design states it, one entry at a time."""
    used = [False] * lay.tblocks
    counts = [0] * NFREE
    for lba in range(lay.nblocks):
        cycle, word = struct.unpack_from("<QQ", table, lba * ENTRY_SIZE)
        pba = word & PBA_MASK
        if word & ~(PBA_MASK | FLAG_ZERO | FLAG_UNUSED) or pba >= lay.tblocks or used[pba]:
            raise CorruptionError(f"LBA {lba}: PBA {pba}")
        used[pba] = True
        lane, count = cycle & LANE_MASK, cycle >> NFREE_SHIFT
        counts[lane] = max(counts[lane], count)
    free = [pba for pba in range(lay.tblocks) if not used[pba]]
    if len(free) != lay.nfree:
        raise CorruptionError(f"{len(free)} free blocks")
    return free, counts


def assert_same(table: bytes | bytearray, lay: Layout = LAY) -> None:
    try:
        expected = reference_recover(bytes(table), lay)
    except CorruptionError:
        with pytest.raises(CorruptionError):
            recover(bytes(table), lay)
        return
    assert recover(bytes(table), lay) == expected


def test_many_threads_many_lanes_match_reference() -> None:
    pool = btt8.create_on(MemoryPmem(16 * MIB), 512)
    data = bytes(512)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(4000):
            if i % 500 == 0:  # move this thread to another lane now and then
                pin_home_lane(pool, rng.randrange(NFREE))
            pool.write(rng.randrange(pool.nblock), data)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    table = pool._pmem.load(LAY.ttoff, LAY.nblocks * ENTRY_SIZE)
    free, counts = reference_recover(bytes(table), LAY)
    assert sum(1 for c in counts if c) > 30  # many lanes really were used
    assert recover(table, LAY) == (free, counts)
    live_free, live_counts = pool.lane_state()
    assert sorted(live_free) == free
    assert all(live >= seen for live, seen in zip(live_counts, counts, strict=True))
    reopened = btt8.Pool(pool._pmem)  # the open path itself, on the same media
    assert reopened.lane_state() == (free, counts)


def permuted_table(rng: random.Random, cycle: object) -> bytearray:
    """A consistent map (a random injection into the data blocks) with cycles from cycle()."""
    pbas = rng.sample(range(LAY.tblocks), LAY.nblocks)
    table = bytearray(LAY.nblocks * ENTRY_SIZE)
    for lba, pba in enumerate(pbas):
        flags = FLAG_ZERO if rng.random() < 0.1 else 0
        struct.pack_into("<QQ", table, lba * ENTRY_SIZE, cycle(rng, lba), pba | flags)
    return table


CYCLES = {
    "fresh": lambda rng, lba: 0,
    "one lane": lambda rng, lba: rng.randrange(1, 1 << 20) << NFREE_SHIFT | 7,
    "all lanes small": lambda rng, lba: rng.randrange(0, 40) << NFREE_SHIFT | rng.randrange(NFREE),
    "lanes of very different scale": lambda rng, lba: (
        rng.randrange(1 << (lba % 48)) << NFREE_SHIFT | (lba * 7) % NFREE),
    "huge counts": lambda rng, lba: rng.randrange(1 << 52) << NFREE_SHIFT | rng.randrange(64),
    "lane 0 and count 0": lambda rng, lba: rng.choice([0, 1 << NFREE_SHIFT, 5, 3 << 12, 4095]),
    "duplicate cycles": lambda rng, lba: (lba % 3 + 1) << NFREE_SHIFT | lba % 5,
    "count just over a byte": lambda rng, lba: rng.choice([255, 256, 1]) << NFREE_SHIFT | lba % 9,
    "mostly fresh": lambda rng, lba: 0 if lba % 97 else rng.randrange(1 << 30),
    # lanes below 256 (recovery's round-by-round path): tops far apart, a lane whose counts
    # all fall in the lowest coarse bucket, more distinct tops than rounds, fresh entries
    "low lanes of different scale": lambda rng, lba: (
        rng.randrange(1 << (2 + 7 * (lba % 6))) << NFREE_SHIFT | (lba % 6) * 37),
    "low lanes, many tops": lambda rng, lba: (
        rng.randrange(1, 2 + (lba % 200) ** 2) << NFREE_SHIFT | lba % 200),
    "low lanes and fresh": lambda rng, lba: (
        0 if lba % 3 else rng.randrange(1, 1 << 20) << NFREE_SHIFT | lba % 8),
}


@pytest.mark.parametrize("name", list(CYCLES))
def test_synthetic_cycles_match_reference(name: str) -> None:
    rng = random.Random(name)
    for _ in range(3):
        assert_same(permuted_table(rng, CYCLES[name]))


def test_fresh_table_matches_reference() -> None:
    assert_same(initial_table(LAY.nblocks, LAY.nfree))


@pytest.mark.parametrize("seed", range(12))
def test_corrupted_tables_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    table = permuted_table(rng, CYCLES["all lanes small"])
    free = reference_recover(bytes(table), LAY)[0]
    for _ in range(rng.randrange(1, 4)):
        lba = rng.randrange(LAY.nblocks)
        off = lba * ENTRY_SIZE + 8
        kind = rng.choice(["duplicate", "out of range", "stray flag bit", "free block",
                           "random cycle", "random byte"])
        if kind == "duplicate":
            table[off:off + 8] = table[(lba + 1) % LAY.nblocks * ENTRY_SIZE + 8:][:8]
        elif kind == "out of range":
            struct.pack_into("<Q", table, off, rng.randrange(LAY.tblocks, 1 << 40))
        elif kind == "stray flag bit":
            table[off + 7] |= 1 << rng.randrange(6)
        elif kind == "free block":  # remap to a free PBA (consistent alone; may collide)
            struct.pack_into("<Q", table, off, rng.choice(free))
        elif kind == "random cycle":
            struct.pack_into("<Q", table, off - 8, rng.randrange(1 << 64))
        else:
            table[rng.randrange(len(table))] = rng.randrange(256)
        assert_same(table)


def test_check_is_read_only_and_raises_on_corruption(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with btt8.create(path, 512, 16 * MIB) as pool:
        for lba in range(100):
            pool.write(lba * 7, bytes([lba]) * 512)
        pool.set_zero(0)
    before = sha(path)
    summary = btt8.check(str(path), 512)
    assert summary["ok"] is True
    assert (summary["nblocks"], summary["free_blocks"]) == (LAY.nblocks, NFREE)
    assert summary["max_lane_count"] == 101 and summary["lanes_used"] == 1
    assert sha(path) == before
    with pytest.raises(btt8.Btt8Error):
        btt8.check(str(path), 4096)  # bsize mismatch: EINVAL
    with path.open("r+b") as f:  # LBA 1 now shares LBA 2's PBA
        f.seek(LAY.ttoff + 1 * ENTRY_SIZE + 8)
        f.write(struct.pack("<Q", NFREE + 2))
    before = sha(path)
    with pytest.raises(CorruptionError, match="PBA 4098 is mapped by both LBA 1 and LBA 2"):
        btt8.check(str(path))
    assert sha(path) == before


def test_identity_ramp_is_the_integers() -> None:
    from btt8 import core

    core._ramp_cache.clear()
    assert core._ramp(300).tolist() == list(range(300))
    big = core._ramp((1 << 24) + 70000)  # runs of equal bytes 256, 65536 and 2**24 long
    for i in (0, 255, 256, 65535, 65536, 65537, (1 << 24) - 1, 1 << 24, (1 << 24) + 69999):
        assert big[i] == i
    assert core._ramp(1000) is big  # kept for later opens
    core._ramp_cache.clear()


@pytest.mark.parametrize("shift", [0, 1000, LAY.nfree])  # free PBAs last, split, first
def test_free_blocks_in_runs_match_reference(shift: int) -> None:
    """Few runs of free PBAs (recover finds each run's ends with memchr): LBA i -> PBA
    (i + shift) mod tblocks, skipping nothing, so the free PBAs are one run (or two, wrapped)."""
    table = bytearray(LAY.nblocks * ENTRY_SIZE)
    for lba in range(LAY.nblocks):
        struct.pack_into("<QQ", table, lba * ENTRY_SIZE, 0, (lba + shift) % LAY.tblocks)
    assert_same(table)
    free, _ = recover(bytes(table), LAY)
    assert free == sorted((LAY.nblocks + shift + i) % LAY.tblocks for i in range(LAY.nfree))
