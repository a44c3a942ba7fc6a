import errno
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import btt8
import btt8.steps
import pytest
from btt8.core import ENTRY_SIZE, FLAG_ZERO, PBA_MASK, SIG, Pool
from btt8.pmem import MemoryPmem, devdax_size
from btt8_helpers import MIB, DurablePmem, pin_home_lane, sha, table_entries


@pytest.fixture
def pool_path(tmp_path: Path) -> Path:
    path = tmp_path / "pool"
    btt8.create(path, 512, 16 * MIB).close()
    return path


def block(tag: int, bsize: int = 512) -> bytes:
    return random.Random(tag).randbytes(bsize)


def test_file_round_trip_survives_reopen(pool_path: Path) -> None:
    with btt8.open(pool_path, 512) as pool:
        assert (pool.bsize, pool.nblock) == (512, 27678)
        assert pool.read(0) == bytes(512)
        pool.write(0, block(1))
        pool.write(pool.nblock - 1, bytearray(block(2)))
        pool.write(7, memoryview(block(3)))
        pool.set_zero(7)
    with btt8.open(pool_path) as pool:
        assert pool.read(0) == block(1)
        assert pool.read(pool.nblock - 1) == block(2)
        assert pool.read(7) == bytes(512)
        buf = bytearray(512)
        pool.read_into(0, buf)
        assert buf == block(1)


def test_create_returns_open_pool_and_refuses_existing(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with btt8.create(path, 512, 16 * MIB, mode=0o600) as pool:
        pool.write(1, block(1))
        assert pool.read(1) == block(1)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.create(path, 512, 16 * MIB)
    assert info.value.errno == errno.EEXIST


def test_open_errors_carry_errno(tmp_path: Path, pool_path: Path) -> None:
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.open(tmp_path / "missing", 512)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.open(pool_path, 4096)
    assert info.value.errno == errno.EINVAL
    small = tmp_path / "small"
    small.write_bytes(bytes(MIB))
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.open(small)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("lba", [-1, 27678, "1", 1.0, None])
def test_bad_lba_is_einval(mem_pool: Pool, lba: object) -> None:
    for op in (mem_pool.read, lambda n: mem_pool.write(n, bytes(512)), mem_pool.set_zero,
               lambda n: mem_pool.read_into(n, bytearray(512))):
        with pytest.raises(btt8.Btt8Error) as info:
            op(lba)
        assert info.value.errno == errno.EINVAL


def test_bad_length_is_einval(mem_pool: Pool) -> None:
    for call in (lambda: mem_pool.write(0, bytes(511)),
                 lambda: mem_pool.read_into(0, bytearray(513))):
        with pytest.raises(btt8.Btt8Error) as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert mem_pool.read(0) == bytes(512)


def test_closed_pool_refuses_io(pool_path: Path) -> None:
    with btt8.open(pool_path) as pool:
        pass
    with pytest.raises(ValueError):
        pool.read(0)


def test_second_open_is_ebusy_in_process_and_across_processes(pool_path: Path) -> None:
    with btt8.open(pool_path):
        with pytest.raises(btt8.Btt8Error) as info:
            btt8.open(pool_path)
        assert info.value.errno == errno.EBUSY
        proc = subprocess.run(
            [sys.executable, "-c", f"import btt8; btt8.open({str(pool_path)!r})"],
            capture_output=True, text=True)
        assert proc.returncode != 0
        assert "in use by another process" in proc.stderr
    btt8.open(pool_path).close()  # the lock went away with the pool


def test_readonly_open_reads_and_refuses_writes(pool_path: Path) -> None:
    with btt8.open(pool_path) as pool:
        pool.write(3, block(3))
    before = sha(pool_path)
    with btt8.open(pool_path, readonly=True) as pool:
        assert pool.read(3) == block(3)
        with pytest.raises(btt8.Btt8Error) as info:
            pool.write(3, block(4))
        assert info.value.errno == errno.EROFS
    assert sha(pool_path) == before


def test_recovery_free_list_is_the_complement_of_the_map() -> None:
    pmem = MemoryPmem(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    rng = random.Random(7)
    for index, lane in enumerate((5, 9, 4095)):
        pin_home_lane(pool, lane)
        for _ in range(300):
            lba = 32 * index + rng.randrange(64)  # overlapping ranges: every lane survives
            if rng.random() < 0.2:
                pool.set_zero(lba)
            else:
                pool.write(lba, block(rng.randrange(1000)))
    entries = table_entries(pool)
    mapped = {pba & PBA_MASK for _, pba in entries}
    expected_free = set(range(pool.layout.tblocks)) - mapped
    expected_counts = [0] * 4096
    for cycle, _ in entries:
        expected_counts[cycle & 4095] = max(expected_counts[cycle & 4095], cycle >> 12)
    live_free, live_counts = pool.lane_state()
    reopened = Pool(pmem)
    free, counts = reopened.lane_state()
    assert len(free) == len(set(free)) == 4096
    assert set(free) == set(live_free) == expected_free
    assert counts == expected_counts
    assert counts[4095] == live_counts[4095] == 300  # the last lane's final write survives
    assert 0 < counts[5] <= live_counts[5]


def test_zero_flag_reads_zero_without_touching_data(mem_pool: Pool) -> None:
    mem_pool.write(2, block(2))
    mem_pool.set_zero(2)
    (_, pba), = table_entries(mem_pool)[2:3]
    assert pba & FLAG_ZERO
    assert mem_pool.read(2) == bytes(512)
    buf = bytearray(b"x" * 512)
    mem_pool.read_into(2, buf)
    assert buf == bytes(512)


def test_fault_flag_publishes_mapping_before_data(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    class Recording(DurablePmem):
        def cas16(self, *args: int) -> bool:
            order.append("swap")
            return super().cas16(*args)

        def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
            order.append("data")
            super().store_persist(off, data)

    pool = btt8.create_on(Recording(16 * MIB), 512)
    order.clear()
    pool.write(0, block(0))
    assert order == ["data", "swap"]
    monkeypatch.setenv("BTT8_TEST_FAULT", "publish-before-data")
    faulty = Pool(pool._pmem)
    assert faulty._fault_publish_before_data
    order.clear()
    faulty.write(0, block(1))
    assert order == ["swap", "data"]
    assert faulty.read(0) == block(1)
    faulty._fault_publish_before_data = False
    order.clear()
    faulty.write(0, block(2))
    assert order == ["data", "swap"]


def _corrupt_entry(path: Path, lba: int, pba: int) -> None:
    with path.open("r+b") as f:
        f.seek(512 + lba * ENTRY_SIZE + 8)
        f.write(struct.pack("<Q", pba))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.open("r+b").write(b"PMBLKBX"), "bad signature"),
    (lambda p: _corrupt_entry(p, 5, 4096 + 9), "PBA 4105 is mapped by both LBA 5 and LBA 9"),
    (lambda p: _corrupt_entry(p, 5, 4096 + 9), "found 4097 free blocks, expected 4096"),
    (lambda p: _corrupt_entry(p, 3, 27678 + 4096), "LBA 3 maps to PBA 31774, out of range"),
    (lambda p: _corrupt_entry(p, 3, (1 << 60) | 7), "LBA 3 maps to PBA"),
    (lambda p: _corrupt_entry(p, 3, 1 << 61), "out of range"),
    (lambda p: _write_super_field(p, 3, 4095), "nfree 4095, expected 4096"),
    (lambda p: _write_super_field(p, 2, 1 << 30), "inconsistent superblock"),
])
def test_corruption_is_a_clear_error_and_open_never_writes(
        pool_path: Path, damage, message: str) -> None:
    damage(pool_path)
    before = sha(pool_path)
    with pytest.raises(btt8.CorruptionError) as info:
        btt8.open(pool_path, 512)
    assert message in str(info.value)
    assert info.value.errno == errno.EUCLEAN
    assert sha(pool_path) == before


def _write_super_field(path: Path, index: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(index * 8)
        f.write(struct.pack("<Q", value))


def test_create_writes_signature_last() -> None:
    class Recording(MemoryPmem):
        stores: list[tuple[int, bytes]] = []

        def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
            self.stores.append((off, bytes(data)))
            super().store_persist(off, data)

    pmem = Recording(16 * MIB)
    pmem.store(0, SIG)  # an old pool being reformatted
    btt8.create_on(pmem, 512)
    assert pmem.stores[0] == (0, bytes(8))  # old signature invalidated before anything else
    assert pmem.stores[-1] == (0, SIG)


def test_device_without_devdax_size_is_a_clear_error() -> None:
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.create("/dev/null", 4096)
    assert info.value.errno == errno.ENODEV


def test_devdax_size_rounds_down_to_alignment(tmp_path: Path) -> None:
    dev = tmp_path / "dev" / "char" / "251:0"
    dev.mkdir(parents=True)
    (dev / "size").write_text(str((64 << 20) + 4096) + "\n")
    assert devdax_size(251, 0, sysfs=str(tmp_path)) == 64 << 20
    (dev / "align").write_text(str(1 << 30))
    (dev / "size").write_text(str(3 << 30))
    assert devdax_size(251, 0, sysfs=str(tmp_path)) == 3 << 30


def test_file_backend_primitives(tmp_path: Path) -> None:
    path = tmp_path / "raw"
    pmem = btt8.MappedPmem(str(path), create_size=MIB)
    try:
        pmem.store_persist(5000, b"hello")  # unaligned range: msync must page-align
        pmem.store_persist(6000, bytearray(b"world"))
        pmem.store8(10, 2**64 - 1)
        assert pmem.load8(10) == 2**64 - 1
        assert pmem.cas16(10, 2**64 - 1, 0, 1, 2)
        assert not pmem.cas16(10, 2**64 - 1, 0, 3, 4)
        assert (pmem.load8(10), pmem.load8(11)) == (1, 2)
        buf = bytearray(5)
        pmem.load_into(6000, buf)
        assert buf == b"world"
        pmem.persist(0, MIB)
        pmem.fence()
    finally:
        pmem.close()
    data = path.read_bytes()
    assert data[5000:5005] == b"hello"
    assert data[80:96] == struct.pack("<QQ", 1, 2)
    assert os.path.getsize(path) == MIB


LIBPMEM_SCRIPT = """
import os, struct, sys
os.environ["PMEM_IS_PMEM_FORCE"] = "1"  # libpmem reads it when it loads: flush-based persists
import btt8
from btt8.pmem import MappedPmem, libpmem
if libpmem() is None:
    print("no libpmem"); sys.exit(0)
path = sys.argv[1]
pmem = MappedPmem(path + ".raw", create_size=1 << 20)
assert pmem.persist_mode == "libpmem", pmem.persist_mode
pmem.store_persist(4096, b"x" * 512)                  # bytes: the C copy-and-persist
pmem.store_persist(8192, bytearray(b"y" * 512))       # other buffers: store, then persist
assert pmem.swap_persist(20, 0, 0, 7, 9) and not pmem.swap_persist(20, 0, 0, 1, 1)
btt8.pmem._FAST_LEN = 1024  # sizes from 2**31 up go through the argtyped call: try it small
pmem.persist(0, 4096)
pmem.store_persist(12288, b"w" * 2048)
btt8.pmem._FAST_LEN = 1 << 31
pmem.close()
with open(path + ".raw", "rb") as f:
    data = f.read()
assert data[4096:4608] == b"x" * 512 and data[8192:8704] == b"y" * 512
assert data[12288:14336] == b"w" * 2048
assert data[160:176] == struct.pack("<QQ", 7, 9)
pool = btt8.create(path, 512, 16 << 20)
pool.write(3, b"z" * 512)
pool.close()
for call in (lambda: pool.write(3, b"z" * 512), lambda: pool.read(3)):
    try:
        call()
    except (ValueError, TypeError) as exc:  # a closed pool raises, never touches the unmapping
        print(type(exc).__name__)
with btt8.open(path) as pool:
    assert pool.read(3) == b"z" * 512
print("ok")
"""


def test_libpmem_backend_fast_calls_and_use_after_close(tmp_path: Path) -> None:
    """The libpmem persist path (ctypes without argtypes through a PyDLL handle) writes what it
    is given, falls back for big ranges and non-bytes data, and after close() raises instead of
    writing through a dangling pointer (that segfaulted before)."""
    proc = subprocess.run([sys.executable, "-c", LIBPMEM_SCRIPT, str(tmp_path / "pool")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines == ["no libpmem"] or lines[-1] == "ok" and len(lines) == 3


class SplittingPmem(MemoryPmem):
    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        return super().cas16(word, old_lo, old_hi, new_lo, new_hi)


def test_only_the_builtin_cas16_counts_as_an_atomic_swap() -> None:
    assert MemoryPmem(16 * MIB).atomic_swap and DurablePmem(16 * MIB).atomic_swap
    assert not SplittingPmem(16 * MIB).atomic_swap  # an override may split the stores
    assert btt8.create_on(MemoryPmem(16 * MIB), 512)._swap_is_atomic
    assert not btt8.create_on(SplittingPmem(16 * MIB), 512)._swap_is_atomic


def test_cas16_stores_both_halves_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap is one struct.pack_into call (GIL held throughout), never two item stores a
    thread switch could fall between; the fields are native 8-byte words (one mov each)."""
    import btt8.pmem as pmem_module

    calls: list[tuple[int, int, int]] = []
    real = pmem_module._PAIR

    class Spy:
        size = real.size

        @staticmethod
        def pack_into(buf: memoryview, off: int, lo: int, hi: int) -> None:
            calls.append((off, lo, hi))
            real.pack_into(buf, off, lo, hi)

    monkeypatch.setattr(pmem_module, "_PAIR", Spy)
    pmem = MemoryPmem(MIB)
    assert pmem.cas16(10, 0, 0, 5, 6)
    assert calls == [(80, 5, 6)] and (pmem.load8(10), pmem.load8(11)) == (5, 6)
    assert real.format == "QQ" and real.size == 16


def test_one_writer_thread_uses_one_lane_and_writers_in_flight_get_their_own(
        mem_pool: Pool) -> None:
    for lba in range(50):
        mem_pool.write(lba, block(lba))
    counts = mem_pool.lane_state()[1]
    assert sum(1 for c in counts if c) == 1 and max(counts) == 50
    first = btt8.steps.write_steps(mem_pool, 1, block(1))
    second = btt8.steps.write_steps(mem_pool, 2, block(2))
    next(first), next(first), next(second), next(second)  # both past Wstart
    lanes = set(range(btt8.NFREE)) - set(mem_pool._free_lanes)
    assert len(lanes) == 2
    for _ in first:
        pass
    for _ in second:
        pass
    assert len(mem_pool._free_lanes) == btt8.NFREE


def test_lba_may_be_any_integer_type(mem_pool: Pool) -> None:
    """LBAs are checked as list indices are: anything with __index__ (numpy integers, bool)."""

    class Index:
        def __index__(self) -> int:
            return 5

    mem_pool.write(Index(), block(5))  # type: ignore[arg-type]
    assert mem_pool.read(5) == block(5) == mem_pool.read(Index())  # type: ignore[arg-type]
    buf = bytearray(512)
    mem_pool.read_into(True, buf)
    assert buf == mem_pool.read(1)
    mem_pool.set_zero(Index())  # type: ignore[arg-type]
    assert mem_pool.read(5) == bytes(512)


def test_read_into_a_reused_memoryview(mem_pool: Pool) -> None:
    mem_pool.write(4, block(4))
    buf = bytearray(512)
    view = memoryview(buf)
    for lba in (4, 5, 4):
        mem_pool.read_into(lba, view)
        assert buf == mem_pool.read(lba)
    with pytest.raises(btt8.Btt8Error) as info:
        mem_pool.read_into(4, view[:511])
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("damage", [
    lambda raw: raw[:40] + (int.from_bytes(raw[40:48], "little") ^ (1 << 12)).to_bytes(8, "little")
    + raw[48:],                                                             # dataoff bit flip
    lambda raw: raw[:16] + (int.from_bytes(raw[16:24], "little") - 1).to_bytes(8, "little")
    + raw[24:],                                                             # nblocks - 1
    lambda raw: raw[:48] + bytes(8) + raw[56:],                             # checksum wiped
], ids=["dataoff-bit", "nblocks-minus-1", "checksum"])
def test_a_superblock_field_altered_alone_is_corruption(pool_path: Path, damage) -> None:
    """Each field is checked against the others and the checksum: a pool that opened after
    one of these would read another LBA's block (issue 11)."""
    with pool_path.open("r+b") as f:
        raw = f.read(64)
        f.seek(0)
        f.write(damage(raw))
    before = sha(pool_path)
    with pytest.raises(btt8.CorruptionError, match="inconsistent superblock"):
        btt8.open(pool_path, 512)
    with pytest.raises(btt8.CorruptionError):
        btt8.check(str(pool_path), 512)
    assert sha(pool_path) == before
