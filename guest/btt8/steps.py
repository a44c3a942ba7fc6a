"""The PlusCal steps of read and write as generators, for schedulers that interleave threads.

Each generator yields the label of the step it is about to execute, so a driver (a test, or the
later model checker) decides who runs next; the step then runs when the driver calls next() again.
The steps use the same pool state and the same persistence interface as the production
Pool.read / Pool.write, which stay straight-line code so the interposition costs them nothing.
tests/btt8_core/test_steps.py checks that both produce the same media and lane state.

    writer = write_steps(pool, lba, data)
    for label in writer: ...           # label in WRITE_LABELS, the step has not run yet
    reader = read_steps(pool, lba, buf)
    ...; the generator's return value (StopIteration.value) is the read's retry count
    creator = create_steps(pmem, layout)   # format_pool, with CREATE_LABELS (not from the spec)
"""

from __future__ import annotations

from collections.abc import Generator

from .core import (
    FLAG_ZERO,
    LANE_MASK,
    NFREE,
    NFREE_SHIFT,
    PBA_MASK,
    SIG,
    Layout,
    Pool,
    cycle_count,
    initial_table,
)
from .pmem import Pmem

WRITE_LABELS = ("Wstart", "WwriteBlock", "WloadOldCycle", "WloadOldPBA", "WswapMapping",
                "WpersistMapping", "WupdateCycle", "WputFreeBlock")
READ_LABELS = ("RloadPreCycle", "RloadPBA", "RloadLaneCycle", "RpersistMapping", "RcopyBlock",
               "RcheckAtomicity")
# The spec has no create; its steps are named in the same style so a cut can land at each.
CREATE_LABELS = ("CclearSignature", "CwriteSuper", "CwriteTable", "CpersistLayout",
                 "CwriteSignature")


def write_steps(pool: Pool, lba: int, data: bytes | None) -> Generator[str, None, bool]:
    """Pool.write (or Pool.set_zero when data is None) one step at a time. Several writers driven
    from one thread each get their own lane: each takes a lane off the free-lane stack (the
    first the thread's pinned lane, if any). Returns whether the swap happened."""
    lba = pool._check_lba(lba)
    if data is not None:
        pool._check_len(data)
    pmem = pool._pmem
    yield "Wstart"
    lane = pool._acquire_lane()
    try:
        newpba = pool._lane_free[lane]
        if data is None:
            newpba |= FLAG_ZERO
        else:
            yield "WwriteBlock"
            if pool._test_fault == "unpersisted-data":  # TEST ONLY: Pool._inject_test_fault
                pmem.store(pool._dataoff + newpba * pool.bsize, data)
            else:
                pmem.store_persist(pool._dataoff + newpba * pool.bsize, data)
        word = pool._tt_word + 2 * lba
        yield "WloadOldCycle"
        oldcycle = pmem.load8(word)
        newcycle = pool._lane_next[lane]  # make_cycle(lane, lane count + 1)
        yield "WloadOldPBA"
        oldpba = pmem.load8(word + 1)
        yield "WswapMapping"
        swapped = pmem.cas16(word, oldcycle, oldpba, newcycle, newpba)
        yield "WpersistMapping"
        # A lost CAS: a concurrent write superseded this one, which returns as linearized just
        # before it; that entry must be durable before this write is acknowledged.
        if pool._test_fault != "unpersisted-mapping":
            pmem.persist(word * 8 + 8, 8)
        if swapped:
            yield "WupdateCycle"
            pool._lane_next[lane] = newcycle + NFREE  # lane count + 1
        yield "WputFreeBlock"
        if swapped:
            pool._lane_free[lane] = oldpba & PBA_MASK
    finally:
        pool._release_lane(lane)
    return swapped


def read_steps(pool: Pool, lba: int, buf: bytearray) -> Generator[str, None, int]:
    """Pool.read_into one step at a time, retrying until RcheckAtomicity holds. Returns the
    number of retries (the hungry-reader hand-shake is the production path's business)."""
    lba = pool._check_lba(lba)
    pool._check_len(buf)
    pmem = pool._pmem
    word = pool._tt_word + 2 * lba
    retries = 0
    while True:
        yield "RloadPreCycle"
        pre = pmem.load8(word)
        yield "RloadPBA"
        pba = pmem.load8(word + 1)
        yield "RloadLaneCycle"
        lane_next = pool._lane_next[pre & LANE_MASK]  # make_cycle(lane, lane count + 1)
        yield "RpersistMapping"
        helps = lane_next == pre  # the entry's count is the lane's count + 1
        if pool._test_fault == "cycle-shift":  # TEST ONLY: the seed's count = cycle << 12
            helps = pre << NFREE_SHIFT == cycle_count(lane_next)
        if helps and pool._test_fault != "unpersisted-mapping":
            pmem.persist(word * 8 + 8, 8)
        yield "RcopyBlock"
        if pba & FLAG_ZERO:
            buf[:] = bytes(len(buf))
        else:
            pmem.load_into(pool._dataoff + (pba & PBA_MASK) * pool.bsize, buf)
        yield "RcheckAtomicity"
        # the PBA too unless the backend's swaps are atomic: see Pool.read
        if pmem.load8(word) == pre and (pool._swap_is_atomic or pmem.load8(word + 1) == pba):
            return retries
        retries += 1


def create_steps(pmem: Pmem, lay: Layout) -> Generator[str, None, None]:
    """core.format_pool one step at a time (tests/btt8_core/test_steps.py: same media). The
    signature is cleared first and written last: a cut at any step leaves the old pool or none."""
    yield "CclearSignature"
    pmem.store_persist(0, bytes(len(SIG)))
    yield "CwriteSuper"
    pmem.store(len(SIG), lay.pack()[len(SIG):])
    yield "CwriteTable"
    pmem.store(lay.ttoff, initial_table(lay.nblocks, lay.nfree))
    yield "CpersistLayout"
    pmem.persist(0, lay.dataoff)
    pmem.fence()
    yield "CwriteSignature"
    pmem.store_persist(0, SIG)
