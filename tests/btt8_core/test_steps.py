"""The stepped read/write (btt8.steps) match production and keep BTT8's promises under any
interleaving of their PlusCal steps."""

import random

import btt8
from btt8.core import Layout, Pool, format_pool
from btt8.pmem import MemoryPmem
from btt8.steps import (
    CREATE_LABELS,
    READ_LABELS,
    WRITE_LABELS,
    create_steps,
    read_steps,
    write_steps,
)
from btt8_helpers import MIB, DurablePmem, pin_home_lane
from hypothesis import given, settings
from hypothesis import strategies as st

ops = st.lists(st.tuples(st.sampled_from(["write", "zero"]), st.integers(0, 7),
                         st.integers(0, 255)), max_size=40)


def payload(tag: int) -> bytes:
    return random.Random(tag).randbytes(512)


@settings(max_examples=20, deadline=None)
@given(ops=ops)
def test_steps_leave_the_same_media_and_lanes_as_production(ops) -> None:
    production = btt8.create_on(MemoryPmem(16 * MIB), 512)
    stepped = btt8.create_on(MemoryPmem(16 * MIB), 512)
    pin_home_lane(production, 5)
    pin_home_lane(stepped, 5)
    labels = set()
    for op, lba, tag in ops:
        if op == "write":
            production.write(lba, payload(tag))
            labels.update(write_steps(stepped, lba, payload(tag)))
        else:
            production.set_zero(lba)
            labels.update(write_steps(stepped, lba, None))
    assert production._pmem.snapshot() == stepped._pmem.snapshot()
    assert production.lane_state() == stepped.lane_state()
    assert labels <= set(WRITE_LABELS)
    buf = bytearray(512)
    for lba in range(8):
        assert set(read_steps(stepped, lba, buf)) == set(READ_LABELS)
        assert buf == production.read(lba)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_interleaving_gives_atomic_persisted_reads(data) -> None:
    pmem = DurablePmem(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    pin_home_lane(pool, 5)
    old, new1, new2 = payload(1), payload(2), payload(3)
    pool.write(0, old)
    buf = bytearray(512)
    actors = {"w1": write_steps(pool, 0, new1), "w2": write_steps(pool, 0, new2),
              "r": read_steps(pool, 0, buf)}
    finished_writes: list[bytes] = []
    while actors:
        name = data.draw(st.sampled_from(sorted(actors)))
        try:
            next(actors[name])
        except StopIteration:
            del actors[name]
            if name == "r":
                assert bytes(buf) in (old, new1, new2)  # whole blocks only
                # Everything a reader returned is durable at the moment it returns.
                assert Pool(pmem.after_power_cut()).read(0) == bytes(buf)
                assert not finished_writes or bytes(buf) != old  # no read of a stale value
            else:
                finished_writes.append(new1 if name == "w1" else new2)
    final = pool.read(0)
    assert final in (new1, new2)
    assert Pool(pmem.after_power_cut()).read(0) == final


class SplitCasPmem(MemoryPmem):
    """MemoryPmem whose emulated 16-byte CAS runs `between` after storing the cycle and before
    storing the PBA: the one instant the emulation exposes and real cmpxchg16b does not."""

    between = None

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        q = self._q
        if q[word] != old_lo or q[word + 1] != old_hi:
            return False
        q[word] = new_lo
        hook, self.between = self.between, None
        if hook is not None:
            hook()
        q[word + 1] = new_hi
        return True


def test_reader_between_the_cas_halves_never_returns_a_reused_block() -> None:
    """A reader loads the new cycle but the old PBA (mid-CAS); the write completes and frees the
    old PBA to its lane; the lane's next write (another LBA) fills that block while the reader
    copies it. The cycle alone still matches, so RcheckAtomicity must also see the PBA move."""
    pmem = SplitCasPmem(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    pin_home_lane(pool, 5)
    a, b, other = payload(1), payload(2), payload(3)
    pool.write(0, a)
    buf = bytearray(512)
    reader = read_steps(pool, 0, buf)

    def read_mapping() -> None:
        assert next(reader) == "RloadPreCycle"
        assert next(reader) == "RloadPBA"
        assert next(reader) == "RloadLaneCycle"  # pre = new cycle, pba = old PBA

    pmem.between = read_mapping
    pool.write(0, b)          # frees the old PBA of LBA 0 to lane 5
    pool.write(1, other)      # lane 5 reuses it for LBA 1
    for _ in reader:
        pass
    assert bytes(buf) in (a, b), "the read returned another LBA's data"


def test_create_steps_lay_down_what_format_pool_does() -> None:
    lay = Layout.for_pool(512, 16 * MIB)
    production, stepped = MemoryPmem(16 * MIB), MemoryPmem(16 * MIB)
    stepped.store(0, b"\xa5" * 4096)  # an old superblock and table underneath
    production.store(0, b"\xa5" * 4096)
    format_pool(production, lay)
    assert tuple(create_steps(stepped, lay)) == CREATE_LABELS
    assert production.snapshot() == stepped.snapshot()
    assert Pool(stepped).nblock == lay.nblocks
