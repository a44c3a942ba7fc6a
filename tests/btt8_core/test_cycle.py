"""Regression tests for the seed's CYCLE_CYCLE bug (count = cycle << 12 instead of >> 12).

With the shifted count, readers never see an entry as one count ahead of its lane, so they never
persist a mapping a writer has swapped but not yet persisted; and recovery seeds lane counts with
garbage, so a reopened pool reuses (lane, count) pairs already in the table (ABA)."""

import random

import btt8
import pytest
from btt8.core import Pool, cycle_count, cycle_lane, make_cycle
from btt8.steps import read_steps, write_steps
from btt8_helpers import MIB, DurablePmem, pin_home_lane, table_entries


def run_until(gen, label: str) -> None:
    """Advance a step generator so that `label` is the next step to run."""
    for step in gen:
        if step == label:
            return
    raise AssertionError(f"never reached {label}")


@pytest.mark.parametrize(("lane", "count"), [(0, 1), (5, 1), (4095, 7), (1, 2**40)])
def test_cycle_fields_round_trip(lane: int, count: int) -> None:
    cycle = make_cycle(lane, count)
    assert cycle_lane(cycle) == lane
    assert cycle_count(cycle) == count


@pytest.mark.parametrize("read", ["read", "read_into", "read_steps"])
def test_reader_persists_a_swapped_but_unpersisted_mapping(
        durable_pool: Pool, read: str) -> None:
    pmem: DurablePmem = durable_pool._pmem
    data = random.Random(1).randbytes(512)
    pin_home_lane(durable_pool, 17)
    durable_pool.write(3, bytes(512))  # lane 17 now at count 1
    writer = write_steps(durable_pool, 3, data)
    run_until(writer, "WpersistMapping")  # swapped: entry at count 2, lane still at 1
    entry_pba = durable_pool._tt_word * 8 + 3 * 16 + 8
    assert pmem.durable[entry_pba:entry_pba + 8] != pmem.load(entry_pba, 8)
    pmem.persists.clear()

    buf = bytearray(512)
    if read == "read":
        got = durable_pool.read(3)
    elif read == "read_into":
        durable_pool.read_into(3, buf)
        got = bytes(buf)
    else:
        for _ in read_steps(durable_pool, 3, buf):
            pass
        got = bytes(buf)

    assert got == data
    assert (entry_pba, 8) in pmem.persists  # RpersistMapping fired
    assert pmem.durable[entry_pba:entry_pba + 8] == pmem.load(entry_pba, 8)
    # What the reader returned survives a power cut right now.
    assert Pool(pmem.after_power_cut()).read(3) == data

    for _ in writer:
        pass
    pmem.persists.clear()
    assert durable_pool.read(3) == data
    assert pmem.persists == []  # entry count == lane count: nothing left to persist


def test_recovery_restores_lane_counts_so_no_cycle_is_reused() -> None:
    pmem = DurablePmem(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    pin_home_lane(pool, 9)
    for lba in range(5):
        pool.write(lba, bytes([lba]) * 512)  # lane 9, counts 1..5
    # Cut power between WpersistMapping and WupdateCycle, so the
    # highest count in the table is one the live lane never recorded.
    writer = write_steps(pool, 5, b"\x05" * 512)
    run_until(writer, "WupdateCycle")
    crashed = Pool(pmem.after_power_cut())
    assert crashed.lane_state()[1][9] == 6
    pin_home_lane(crashed, 9)
    for lba in range(6, 12):
        crashed.write(lba, b"\x07" * 512)
    pairs = [cycle for cycle, _ in table_entries(crashed) if cycle]
    assert len(pairs) == len(set(pairs)) == 12
    assert sorted(cycle_count(c) for c in pairs) == list(range(1, 13))
