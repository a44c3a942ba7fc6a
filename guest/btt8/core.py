"""BTT8 core: layout, create, open with recovery, read, write, set_zero.

On media (all little-endian u64):
    block 0         superblock {sig "PMBLKBB\\0", bsize, nblocks, nfree, ttoff, dataoff}
    ttoff = bsize   translation table, nblocks 16-byte entries {lo: cycle, hi: PBA | flags}
    dataoff         nblocks + nfree data blocks; PBA p lives at dataoff + p * bsize

A cycle is (lane-local count << 12) | lane. Its count is `cycle >> 12` (the seed's C shifted left
here, so readers never helped persist and recovery seeded wrong lane counts).

The production read and write are written out straight, with each PlusCal step labelled in a
comment; btt8.steps holds the same steps as generators that yield at every label, for tests and
for a model checker to interleave without slowing the production path.

Concurrency is that of one CPython process (the pool file is flock-ed): a writer's lane is popped
off a stack of free lanes and pushed back when done (list.pop/append: single C calls, atomic under
the GIL); the 16-byte CAS is the persistence layer's cas16 (see btt8.pmem: both halves stored in
one C call, so a reader never sees half a swap and RcheckAtomicity compares the cycle, as the spec
does; a backend that cannot promise that makes readers compare the PBA as well).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import mmap
import operator
import os
import re
import stat
import struct
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from itertools import compress, repeat
from types import TracebackType
from typing import Literal, NamedTuple

from .pmem import MappedPmem, Pmem, with_model

SIG = b"PMBLKBB\0"
MIN_POOL = 16 << 20
MIN_BSIZE = 512
NFREE_SHIFT = 12
NFREE = 1 << NFREE_SHIFT  # free blocks reserved, and number of lanes
LANE_MASK = NFREE - 1
ENTRY_SIZE = 16
FLAG_ZERO = 1 << 63
FLAG_UNUSED = 1 << 62
PBA_MASK = (1 << 62) - 1
_SCAN_CHUNK = 4096  # entries compared at a time against the initial map
HUNGRY_AFTER = 3  # failed re-checks before a reader asks writers to hold off

SUPER = struct.Struct("<8sQQQQQ")  # sig, bsize, nblocks, nfree, ttoff, dataoff
SUPER_SUM = 8  # then BLAKE2b-64 of the five fields: one flipped bit is not a consistent pool
SUPER_SIZE = SUPER.size + SUPER_SUM


def _super_sum(fields: bytes) -> bytes:
    return hashlib.blake2b(fields, digest_size=SUPER_SUM).digest()


def cycle_count(cycle: int) -> int:
    return cycle >> NFREE_SHIFT


def cycle_lane(cycle: int) -> int:
    return cycle & LANE_MASK


def make_cycle(lane: int, count_: int) -> int:
    return (count_ << NFREE_SHIFT) | lane


class Btt8Error(OSError):
    """A BTT8 failure carrying an errno (ENOENT, EEXIST, EINVAL, EBUSY, ...)."""


class CorruptionError(Btt8Error):
    """The pool is not a consistent BTT8 pool (bad signature, superblock or map).

    errno is EUCLEAN ("structure needs cleaning"), the errno Linux filesystems use for
    on-media corruption."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(errno.EUCLEAN, message, path)


def _einval(message: str, path: str | None = None) -> Btt8Error:
    return Btt8Error(errno.EINVAL, message, path)


class Layout:
    """Superblock values; computed by `Layout.for_pool` or read from media."""

    __slots__ = ("bsize", "nblocks", "nfree", "ttoff", "dataoff")

    def __init__(self, bsize: int, nblocks: int, nfree: int, ttoff: int, dataoff: int) -> None:
        self.bsize, self.nblocks, self.nfree = bsize, nblocks, nfree
        self.ttoff, self.dataoff = ttoff, dataoff

    @property
    def tblocks(self) -> int:
        return self.nblocks + self.nfree

    @classmethod
    def for_pool(cls, bsize: int, poolsize: int) -> Layout:
        """Seed sizing: B = pool/bsize, K = B-1, D = K*bsize // (bsize+16), T = K-D."""
        if bsize < MIN_BSIZE or bsize % ENTRY_SIZE:
            raise _einval(f"bsize {bsize}: must be >= {MIN_BSIZE} and a multiple of "
                          f"{ENTRY_SIZE}")
        if poolsize < MIN_POOL:
            raise _einval(f"pool size {poolsize}: must be >= {MIN_POOL} (16 MiB)")
        b = poolsize // bsize
        k = b - 1
        d = k * bsize // (bsize + ENTRY_SIZE)
        t = k - d
        if d <= NFREE or t * bsize // ENTRY_SIZE < d:
            raise _einval(f"pool size {poolsize} too small for bsize {bsize}: "
                          f"{d} data blocks, need more than {NFREE}")
        return cls(bsize, d - NFREE, NFREE, bsize, (t + 1) * bsize)

    @classmethod
    def from_super(cls, raw: bytes, poolsize: int, path: str | None = None) -> Layout:
        sig, bsize, nblocks, nfree, ttoff, dataoff = SUPER.unpack(raw[:SUPER.size])
        if sig != SIG:
            raise CorruptionError(f"bad signature {sig!r}, expected {SIG!r}", path)
        lay = cls(bsize, nblocks, nfree, ttoff, dataoff)
        problem = lay._inconsistency(poolsize)
        if problem:
            raise CorruptionError(f"inconsistent superblock: {problem}", path)
        if raw[SUPER.size:SUPER_SIZE] != _super_sum(raw[len(SIG):SUPER.size]):
            raise CorruptionError("inconsistent superblock: checksum mismatch (a field was "
                                  "altered)", path)
        return lay

    def _inconsistency(self, poolsize: int) -> str:
        if self.bsize < MIN_BSIZE or self.bsize % ENTRY_SIZE:
            return f"bsize {self.bsize}"
        if self.nfree != NFREE:
            return f"nfree {self.nfree}, expected {NFREE}"
        if self.nblocks < 1:
            return "no blocks"
        if self.ttoff != self.bsize:
            return f"table offset {self.ttoff}, expected {self.bsize}"
        if self.dataoff % self.bsize or self.dataoff < self.ttoff + self.nblocks * ENTRY_SIZE:
            return f"data offset {self.dataoff} overlaps the table or is misaligned"
        if self.dataoff + self.tblocks * self.bsize > poolsize:
            return f"data area ends past the pool size {poolsize}"
        # The fields must be what the sizing rule gives for the pool they describe (its block
        # count K + 1 follows from dataoff and nblocks).
        k = self.dataoff // self.bsize - 1 + self.nblocks + self.nfree
        try:
            sized = Layout.for_pool(self.bsize, (k + 1) * self.bsize)
        except Btt8Error:
            sized = None
        if sized is None or (sized.nblocks, sized.dataoff) != (self.nblocks, self.dataoff):
            return (f"block count {self.nblocks} and data offset {self.dataoff} do not follow "
                    f"the sizing rule")
        return ""

    def pack(self, sig: bytes = SIG) -> bytes:
        """The superblock: signature, fields, checksum of the fields."""
        raw = SUPER.pack(sig, self.bsize, self.nblocks, self.nfree, self.ttoff, self.dataoff)
        return raw + _super_sum(raw[len(SIG):])


def initial_table(nblocks: int, nfree: int) -> bytearray:
    """Map LBA i -> PBA i + nfree with the ZERO flag, cycle 0 (built without a Python loop)."""
    table = bytearray(nblocks * ENTRY_SIZE)
    words = memoryview(table).cast("Q")
    words[1::2] = memoryview(array("Q", range(nfree + FLAG_ZERO, nfree + nblocks + FLAG_ZERO)))
    words.release()
    return table


def format_pool(pmem: Pmem, lay: Layout) -> None:
    """Lay down a fresh pool. The signature is cleared first and written last, so a crash at any
    point leaves either the old pool intact or no pool."""
    pmem.store_persist(0, bytes(len(SIG)))
    pmem.store(len(SIG), lay.pack()[len(SIG):])
    pmem.store(lay.ttoff, initial_table(lay.nblocks, lay.nfree))
    pmem.persist(0, lay.dataoff)
    pmem.fence()
    pmem.store_persist(0, SIG)


# ---------------------------------------------------------------------------------------------
# Recovery
#
# Everything here works on whole byte planes of the table (plane k = table[k::16], byte k of
# every entry: a 1-byte-per-entry vector), with the operations CPython runs at C speed over a
# buffer: step slicing, bytes.translate (a 256-entry lookup per byte), big-int bitwise ops,
# memchr (`in`), re.finditer. Per-entry Python work is kept to the few candidate entries.


# Byte tables for bytes.translate.
_LANE_HI = bytes(b & 0x0F for b in range(256))  # low nibble of cycle byte 1: lane bits 8-11
_COUNT_LO = bytes(b & 0xF0 for b in range(256))  # high nibble of cycle byte 1: count bits 0-3
_NONZERO = bytes(1 if b else 0 for b in range(256))
_BIT_LENGTH = bytes(b.bit_length() for b in range(256))
_SHR = [bytes(b >> r for b in range(256)) for r in range(8)]
_SHL = [bytes((b << r) & 0xFF for b in range(256)) for r in range(8)]
_LOW4 = bytes(b & 0x0F for b in range(256))
_LANE_HI_NONZERO = bytes(1 if b & 0x0F else 0 for b in range(256))
_IS_ZERO = bytes([1]) + bytes(255)
_BYTE = [bytes([b]) for b in range(256)]
_BYTE_RE = [re.compile(re.escape(b)) for b in _BYTE]  # finditer of one byte value
_MAX_ROUNDS = 16  # _tops_by_rounds gives up (and _tops_by_keys runs) after this many rounds
_FEW = 1 << 16  # remaining entries few enough to read one by one


def _or_planes(planes: list[bytes]) -> bytes:
    """Byte-wise OR of equal-length byte strings, as one big-int OR (C speed)."""
    acc = 0
    for plane in planes:
        acc |= int.from_bytes(plane, "little")
    return acc.to_bytes(len(planes[0]), "little")


class _Table(NamedTuple):
    """The translation table inside a buffer that step-slices at C speed (bytes or bytearray;
    an mmap can, but slower): n entries from byte `base`."""

    buf: bytes | bytearray | mmap.mmap
    base: int
    n: int

    def plane(self, k: int, step: int = ENTRY_SIZE) -> bytes:
        """Byte k of every entry (step 16), or bytes k and k + 8 of every entry (step 8)
        (a bytearray from a bytearray buffer: the same operations apply)."""
        return self.buf[self.base + k : self.base + ENTRY_SIZE * self.n : step]  # type: ignore

    def words(self, fmt: Literal["I", "Q"], first: int, step: int) -> memoryview:
        """A strided view of words of the entries (no copy)."""
        whole = memoryview(self.buf)[self.base : self.base + ENTRY_SIZE * self.n]
        return whole.cast(fmt)[first::step]


def _lane_counts(table: _Table, zero_planes: tuple[int, ...] = ()) -> list[int]:
    """Per-lane maximum count (count = cycle >> 12, lane = cycle & 0xFFF) over all entries.

    Sorting every cycle costs O(n log n) Python-object compares (~0.4 s for 650k distinct
    cycles). Instead:
    1. Only the cycle byte planes up to the highest non-zero one are sliced out (a pool whose
       counts stay below 2**20 needs planes 0-3), and turned into big ints. M = the largest
       count; s = bits to drop so that coarse = count >> s fits in one byte (shifts and masks
       on the big ints, byte-wise). count >> s is monotone, so a lane's max-count entry has the
       lane's top coarse value.
    2. Each lane's top coarse value. When every lane is below 256 (the lane is then plane 0
       alone; the usual case: writers take the lowest free lanes): _tops_at_top if all lanes
       share the top value (tried first for one lane, or more than 15), else
       _tops_by_nibbles (up to 15 lanes), else _tops_by_rounds; otherwise, or when none of
       these decides, _tops_by_keys.
    3. The exact count comes from the few candidate entries at a lane's top coarse value.
    Entries with count 0 (fresh ones: cycle 0) never raise a lane above its default 0.
    zero_planes: cycle bytes (2-7) the caller already knows to be zero in every entry."""
    counts = [0] * NFREE
    nblocks = table.n
    zero = bytes(nblocks)
    plane1 = table.plane(1)
    count_planes = [plane1.translate(_COUNT_LO)]  # count bits only; lane bits come from below
    for k in range(7, 1, -1):
        if k in zero_planes:  # the caller saw cycle byte k all zero
            continue
        top_plane = table.plane(k)
        if top_plane != zero:
            count_planes += [table.plane(j) for j in range(2, k)] + [top_plane]
            break
    high = len(count_planes)  # highest non-zero cycle byte (1 when counts are below 16)
    if high == 1 and count_planes[0] == zero:
        return counts  # every count is 0 (a fresh pool)
    bit_lengths = count_planes[-1].translate(_BIT_LENGTH)
    top_bits = max(b for b in range(1, 9) if _BYTE[b] in bit_lengths)  # memchr, not a loop
    count_bits = 8 * high + top_bits - NFREE_SHIFT  # bit length of M
    shift = NFREE_SHIFT + max(0, count_bits - 8)  # coarse = cycle bits [shift, shift + 8)
    k, r = divmod(shift, 8)
    ints = [int.from_bytes(plane, "little") for plane in count_planes]
    # byte-wise: coarse = plane k >> r | plane k+1 << (8 - r), masks keep bytes apart
    coarse_int = ints[k - 1] >> r & _repeated(0xFF >> r, nblocks)
    if r and k < high:
        coarse_int |= ints[k] << (8 - r) & _repeated(0xFF << (8 - r) & 0xFF, nblocks)
    coarse = coarse_int.to_bytes(nblocks, "little")
    any_bit = 0
    for value in ints:
        any_bit |= value
    any_bit |= any_bit >> 4  # fold each byte's bits into its lowest bit
    any_bit |= any_bit >> 2
    any_bit |= any_bit >> 1
    has_count = any_bit & _repeated(1, nblocks)  # 1 per entry with count >= 1, as a big int
    lane_lo = table.plane(0)
    cycles = table.words("Q", 0, 2)
    lanes_below_256 = 1 not in plane1.translate(_LANE_HI_NONZERO)
    lanes = _lanes_present(lane_lo) if lanes_below_256 else set()
    planes = _CyclePlanes(cycles, lane_lo, coarse, coarse_int, has_count, lanes)
    # _tops_at_top decides when all lanes share the top value: always for one lane (one writer
    # thread), seldom for the lanes of several (the free-lane stack gives them different
    # counts); where _tops_by_nibbles applies, a failed try would only add its cost.
    at_top = len(lanes - {0}) <= 1 or len(lanes | {0}) > 15
    if lanes_below_256 and (
            (at_top and _tops_at_top(planes, counts)) or _tops_by_nibbles(planes, counts)
            or _tops_by_rounds(planes, counts)):
        return counts
    _tops_by_keys(planes, plane1.translate(_LANE_HI), counts)
    return counts


@functools.lru_cache(maxsize=8)
def _repeated(byte: int, n: int) -> int:
    """The big int whose n little-endian bytes are all `byte` (a mask for byte-wise ops)."""
    return int.from_bytes(bytes([byte]) * n, "little")


class _CyclePlanes(NamedTuple):
    cycles: memoryview  # the cycle word of every entry
    lane_lo: bytes  # lane bits 0-7 (plane 0)
    coarse: bytes  # count >> s, one byte per entry
    coarse_int: int  # the same as a big int
    has_count: int  # 1 per entry whose count is >= 1, as a big int
    lanes: set[int]  # the distinct bytes of lane_lo (when every lane is below 256)


def _raise_to(counts: list[int], cycles: memoryview, positions: Iterator[int]) -> list[int]:
    """counts[lane] = max(counts[lane], count) over the entries at positions; their lanes."""
    lanes = []
    for pos in positions:
        cycle = cycles[pos]
        lane, count_ = cycle & LANE_MASK, cycle >> NFREE_SHIFT
        if count_ > counts[lane]:
            counts[lane] = count_
        lanes.append(lane)
    return lanes


def _distinct(plane: bytes) -> set[int]:
    """The distinct bytes of a plane: those of a sample, then whatever is left once they are
    deleted (bytes.translate's delete: one C pass), instead of a memchr probe per value."""
    seen = set(plane[::61])
    rest = plane.translate(None, bytes(seen))
    return seen | set(rest) if rest else seen


_lanes_present = _distinct  # the lanes (below 256) of plane 0


def _tops_at_top(planes: _CyclePlanes, counts: list[int]) -> bool:
    """Lanes below 256 that all share the top coarse value t (every lane writing about as much,
    e.g. one thread per lane): the candidates are the entries at t. False (undecided) when some
    lane (other than lane 0 holding only fresh entries) has no entry at t."""
    coarse, lane_lo = planes.coarse, planes.lane_lo
    t = next((v for v in range(255, 0, -1) if _BYTE[v] in coarse), 0)
    if not t:
        return False
    trial = counts[:]
    found = set(_raise_to(trial, planes.cycles,
                          (m.start() for m in _BYTE_RE[t].finditer(coarse))))
    missing = planes.lanes - found
    if missing - {0}:
        return False
    if missing:  # lane 0 in plane 0 but not at t: fine if all its entries are fresh (count 0)
        zero_lane = int.from_bytes(lane_lo.translate(_IS_ZERO), "little")
        if zero_lane & planes.has_count:
            return False
    counts[:] = trial
    return True


def _tops_by_rounds(planes: _CyclePlanes, counts: list[int]) -> bool:
    """Lanes all below 256 (lane = plane 0). Round after round: t = the top coarse value among
    the entries (count >= 1) of lanes not yet resolved; every such lane with an entry at t has
    t as its own top, so its max-count entry is among the entries at t (a memchr-fast finditer).
    Those lanes are then masked out (one translate of plane 0) and the next round looks at the
    rest. Costs a few vector ops per distinct top value; False (undecided) if the tops are too
    spread out."""
    cycles, lane_lo, coarse_int = planes.cycles, planes.lane_lo, planes.coarse_int
    n = len(lane_lo)
    remaining = everyone = planes.has_count
    masked = planes.coarse  # coarse value of the remaining entries, 0 elsewhere
    resolved = bytearray(256)  # translate table: lane byte -> 1 when the lane is resolved
    t = 256
    for _ in range(_MAX_ROUNDS):
        # the top only goes down from round to round: probe from the last one (memchr each)
        t = next((v for v in range(t - 1, 0, -1) if _BYTE[v] in masked), 0)
        if t:
            positions: Iterator[int] = (m.start() for m in _BYTE_RE[t].finditer(masked))
        else:  # the remaining lanes' counts all have coarse value 0: read them one by one
            left = remaining.to_bytes(n, "little")
            if left.count(1) > _FEW:
                return False
            positions = (m.start() for m in _BYTE_RE[1].finditer(left))
        for lane in _raise_to(counts, cycles, positions):
            resolved[lane] = 1
        member = int.from_bytes(lane_lo.translate(resolved), "little")
        remaining = everyone & ~member
        if not remaining:
            return True
        masked = (coarse_int & remaining * 0xFF).to_bytes(n, "little")
    return False


def _tops_by_nibbles(planes: _CyclePlanes, counts: list[int]) -> bool:
    """Lanes all below 256 and at most 15 of them (False, undecided, otherwise), however far
    apart their tops. Each lane gets an index 1-15 (translate of plane 0), and one byte per
    entry carries (index, a nibble of coarse), 0 for entries with count 0:
    1. key = index << 4 | coarse >> 4: memchr probes give each lane's top high nibble;
    2. key = index << 4 | coarse & 15, kept only for entries at their lane's top high nibble
       (a translate of the first key marks them): probes give the low nibble;
    3. the entries whose key is their lane's top are the candidates (one more translate).
    A dozen vector ops and at most 32 probes per lane, whatever the counts."""
    lane_lo, coarse_int = planes.lane_lo, planes.coarse_int
    lanes = sorted(planes.lanes | {0})
    if len(lanes) > 15:
        return False
    n = len(lane_lo)
    index = bytearray(256)
    for i, lane in enumerate(lanes, 1):
        index[lane] = i << 4
    lane_key = int.from_bytes(lane_lo.translate(index), "little")
    low4 = _repeated(0x0F, n)

    def tops(keys: bytes) -> bytes:
        """Translate table: each lane's largest key present -> 0xFF, everything else -> 0."""
        table = bytearray(256)
        top = dict.fromkeys(range(1, len(lanes) + 1), 0)
        for key in sorted(_distinct(keys)):  # ascending: each lane index ends at its largest
            if key >> 4:
                top[key >> 4] = key
        for key in top.values():
            table[key] = 0xFF * bool(key)
        return bytes(table)

    keep = planes.has_count * 0xFF  # 0xFF per entry with count >= 1
    keys = ((lane_key | coarse_int >> 4 & low4) & keep).to_bytes(n, "little")
    at_top = int.from_bytes(keys.translate(tops(keys)), "little")
    keys = ((lane_key | coarse_int & low4) & at_top).to_bytes(n, "little")
    final = keys.translate(tops(keys))
    _raise_to(counts, planes.cycles, (m.start() for m in _BYTE_RE[0xFF].finditer(final)))
    return True


def _tops_by_keys(planes: _CyclePlanes, lane_hi: bytes, counts: list[int]) -> None:
    """General case. The set of distinct (lane, coarse) keys of the entries with count >= 1 is
    small (at most 256 per lane used), so set() over the key vector gives each lane's top
    coarse value t[lane]. The candidates are all entries with count >= 1 whose coarse is in
    V = {t[lane]} (one translate); they include every lane's max entry, plus only entries of
    lanes whose own top is higher. Worst case (hundreds of lanes with very different counts):
    candidates approach all entries and the final pass costs what a plain sort did."""
    coarse = planes.coarse
    nblocks = len(coarse)
    has_count = planes.has_count.to_bytes(nblocks, "little")
    # key = coarse | lane << 8 | has_count << 24, one little-endian u32 per entry. coarse sits
    # in the low bits so that keys of one lane do not collide in the set's hash table.
    keys = bytearray(4 * nblocks)
    keys[0::4] = coarse
    keys[1::4] = planes.lane_lo
    keys[2::4] = lane_hi
    keys[3::4] = has_count
    top: dict[int, int] = {}
    for key in sorted(set(memoryview(keys).cast("I"))):  # ascending: the last per lane is max
        if key >> 24:
            top[key >> 8 & LANE_MASK] = key & 0xFF
    wanted = set(top.values())
    in_top = coarse.translate(bytes(v in wanted for v in range(256)))
    candidates = _or_planes([in_top.translate(_SHL[1]), has_count])  # 3 = both
    _raise_to(counts, planes.cycles, (m.start() for m in re.finditer(b"\x03", candidates)))


# Valid top bytes of a PBA word: flag bits only (ZERO 0x80, UNUSED 0x40); anything else is a
# PBA >= 2**56, out of range for any pool.
_BAD_FLAG_BYTE = bytes(0 if b in (0x00, 0x40, 0x80, 0xC0) else 1 for b in range(256))
_MARKS = b"\x01" * _SCAN_CHUNK


_ramp_cache: list[memoryview] = []


def _ramp(length: int) -> memoryview:
    """The u32 words 0, 1, ..., length-1 (at least), as a view; kept for later opens. Built
    from its byte planes (byte k of word i is i >> 8k & 0xFF: runs of 256**k equal bytes), four
    step-slice stores, rather than by iterating a range."""
    if _ramp_cache and len(_ramp_cache[0]) >= length:
        return _ramp_cache[0]
    words = bytearray(4 * length)
    for k in range(4):
        run = 1 << 8 * k
        if run <= 256:  # a cycle of 256 runs, repeated
            cycle = b"".join(bytes([v]) * run for v in range(256))
            plane = cycle * -(-length // len(cycle))
        else:  # at most length / 65536 runs: join them
            plane = b"".join(bytes([v & 0xFF]) * min(run, length - v * run)
                             for v in range(-(-length // run)))
        words[k::4] = plane[:length]
    _ramp_cache[:] = [memoryview(bytes(words)).cast("I")]
    return _ramp_cache[0]


def _describe_map_error(table: _Table, lay: Layout) -> str:
    """Slow path, only on a corrupt map: name the first offending LBA."""
    seen: dict[int, int] = {}
    pbas = table.words("Q", 1, 2)
    for lba, pba in enumerate(map(operator.and_, pbas, repeat(PBA_MASK))):
        if pba >= lay.tblocks:
            return f"LBA {lba} maps to PBA {pba}, out of range (max {lay.tblocks - 1})"
        if pba in seen:
            return f"PBA {pba} is mapped by both LBA {seen[pba]} and LBA {lba}"
        seen[pba] = lba
    return "inconsistent map"


def recover(table: bytes, lay: Layout, path: str | None = None) -> tuple[list[int], list[int]]:
    """Scan the table: every PBA in range and used once; the unused PBAs become the lanes' free
    blocks (exactly nfree of them); each lane's count is the max count seen for it.

    Returns (free PBA per lane, count per lane). Raises CorruptionError; never writes."""
    return _recover(_Table(table, 0, lay.nblocks), lay, path)[:2]  # type: ignore[return-value]


def _recover(table: _Table, lay: Layout,
             path: str | None = None) -> tuple[list[int], list[int], bytes]:
    """recover(), plus the flag-byte plane (byte 15 of every entry) for the caller's counts."""
    nblocks, tblocks, nfree = lay.nblocks, lay.tblocks, lay.nfree
    zero = bytes(nblocks)
    # Flags live in bits 62-63, i.e. the top byte of each PBA word; any other bit there means a
    # PBA >= 2**56, out of range for any pool. Bytes 4-6 of a PBA word are 0 in any pool of
    # fewer than 2**32 blocks, so the low 32 bits are the whole PBA.
    # A step of 8 picks byte k of the cycle and byte k of the PBA word together: when bytes 4-6
    # of both are all zero (three slices, the usual case) the cycle planes 4-6 need no look.
    top = table.plane(15)  # step-slicing: far faster than a strided memoryview
    zero2 = bytes(2 * nblocks)
    cycle_zero = tuple(k for k in (4, 5, 6) if table.plane(k, 8) == zero2)
    if 1 in top.translate(_BAD_FLAG_BYTE) or tblocks > 1 << 32 or any(
            table.plane(k + 8) != zero for k in (4, 5, 6) if k not in cycle_zero):
        raise CorruptionError(_describe_map_error(table, lay), path)
    pbas = table.words("I", 2, 4)  # low halves of the PBA words, no copy

    used = bytearray(tblocks)
    # Runs of entries still at their initial PBA (i + nfree) are marked with one slice store;
    # only the entries that moved pay for a per-entry (C-level) store. Every write gives its
    # entry a non-zero cycle, so only a chunk whose cycles are all 0 (an early-exit memoryview
    # compare) can be such a run; it is then checked against the expected words
    # start+nfree+0, +1, ... (one big int, ramp + base * ones: no nblocks-long array).
    chunk = _SCAN_CHUNK if nblocks >= 64 * _SCAN_CHUNK else _SCAN_CHUNK // 4
    zeros = memoryview(bytes(8 * chunk)).cast("Q")
    ramp: memoryview | None = None  # i at index i: the identity map is ramp[nfree:]
    cycles = table.words("Q", 0, 2)
    try:
        for start in range(0, nblocks, chunk):
            end = min(start + chunk, nblocks)
            run = pbas[start:end]
            if cycles[start:end] == zeros[:end - start] and run == (
                    ramp or (ramp := _ramp(tblocks)))[start + nfree:end + nfree]:
                used[start + nfree:end + nfree] = _MARKS[:end - start]
            else:
                # C-level loop; operator.setitem is a fast builtin call (a bound
                # used.__setitem__ goes through a slower method-wrapper)
                deque(map(operator.setitem, repeat(used), run, repeat(1)), maxlen=0)
    except IndexError:
        raise CorruptionError(_describe_map_error(table, lay), path) from None
    free: list[int] = []
    if used.count(b"\x00\x01") < 64:  # few runs of free blocks (a fresh or lightly used pool)
        start = used.find(0)
        while start >= 0:  # each run's ends by memchr, its PBAs by one C-level extend
            end = used.find(1, start)
            end = tblocks if end < 0 else end
            free += range(start, end)
            start = used.find(0, end)
    else:
        free = list(map(re.Match.start, _BYTE_RE[0].finditer(used)))
    if len(free) != nfree:
        detail = _describe_map_error(table, lay)
        raise CorruptionError(f"found {len(free)} free blocks, expected {nfree}: {detail}",
                              path)
    return free, _lane_counts(table, cycle_zero), top


# ---------------------------------------------------------------------------------------------
# The pool


class Pool:
    """An open BTT8 pool (libpmemblk-style). Thread-safe; one process at a time (flock).

    read(lba) -> bytes, read_into(lba, buf) and write(lba, data) are closures built by
    _hot_paths at open: everything they touch is a closure variable, not an attribute.

    Lane state is volatile: _lane_free[lane] is the lane's free PBA and _lane_next[lane] the
    cycle its next write will use, i.e. make_cycle(lane, count + 1) for the lane's count (the
    "lane cycle" of the spec, kept one step ahead so RloadLaneCycle/RpersistMapping is a single
    compare: entry cycle == lane's next cycle <=> entry count == lane count + 1)."""

    read: Callable[[int], bytes]
    read_into: Callable[[int, bytearray | memoryview], None]
    write: Callable[[int, bytes | bytearray | memoryview], None]

    def __init__(self, pmem: Pmem, path: str | None = None) -> None:
        self.path = path
        self._pmem = pmem
        raw = pmem.load(0, SUPER_SIZE)
        lay = Layout.from_super(raw, pmem.size, path)
        self.layout = lay
        self.bsize = lay.bsize
        self.nblock = lay.nblocks
        self.nfree = lay.nfree
        # Recovery slices byte planes out of one bytes copy of the table: an mmap's step slice
        # goes through a fresh temporary buffer (page faults every time), 2.5x slower than a
        # bytes step slice, and there are ~10 planes; the copy itself is one memcpy.
        table = pmem.load(lay.ttoff, lay.nblocks * ENTRY_SIZE)
        self._lane_free, counts, self._flags_at_open = _recover(
            _Table(table, 0, lay.nblocks), lay, path)
        del table
        self._zeroed_at_open = -1
        lane_next = list(range(NFREE, 2 * NFREE))  # count 0 everywhere: next cycle count 1
        for lane in compress(range(NFREE), counts):
            lane_next[lane] = make_cycle(lane, counts[lane] + 1)
        self._lane_next = lane_next
        self._tt_word = lay.ttoff // 8
        self._dataoff = lay.dataoff
        self._zero_block = bytes(lay.bsize)
        # Lanes not held by a writer, as a stack: list.pop() and list.append() are each one
        # C-level operation, atomic under the GIL, and 4x cheaper than a Lock's acquire/release.
        # A lone thread keeps reusing the top lane, so few lanes carry counts (fast recovery).
        self._free_lanes = list(range(NFREE - 1, -1, -1))
        self._home_lane: dict[int, int] = {}  # thread id -> pinned lane (tests only)
        self._hungry = [0]
        self._hungry_lock = threading.Lock()
        # Word views of the table: entry i's cycle is _cycles[i], its PBA word _pbas[i].
        words = pmem.visible_words
        end = self._tt_word + 2 * lay.nblocks
        self._cycles = words[self._tt_word : end : 2]
        self._pbas = words[self._tt_word + 1 : end : 2]
        self._blocks = pmem.visible[lay.dataoff :]  # PBA p at p * bsize
        self._swap_is_atomic = pmem.atomic_swap
        # Hot-path bindings of the persistence interface (one attribute load per call).
        self._load8 = pmem.load8
        self._visible = pmem.visible
        self._store_persist = pmem.store_persist
        self._persist = pmem.persist
        self._cas16 = pmem.cas16
        self.read, self.read_into, self._write_correct = _hot_paths(self)
        self.write = self._write_correct
        if os.environ.get("BTT8_TEST_FAULT") == "publish-before-data":
            self._fault_publish_before_data = True

    # TEST ONLY, not a user option, and unlike publish-before-data not settable from the
    # environment (no CLI, scenario or guest path reaches it): persistence defects that only a
    # write-back-cache model (btt8.pmem.CachePmem) can see.
    #   "unpersisted-data":    WwriteBlock stores the data without persisting it before the swap
    #   "unpersisted-mapping": WpersistMapping skipped, and readers skip RpersistMapping
    #   "cycle-shift":         the seed's real bug: RloadLaneCycle takes the entry's count as
    #                          cycle << 12 (not >> 12), which never equals the lane count + 1,
    #                          so readers never persist an entry they return (RpersistMapping)
    # The hot paths are rebuilt with the defective bindings (no cost to the correct ones);
    # btt8.steps reads _test_fault as well.
    _test_fault = ""

    def _inject_test_fault(self, fault: str) -> None:
        if fault not in ("", "unpersisted-data", "unpersisted-mapping", "cycle-shift"):
            raise ValueError(f"unknown test fault {fault!r}")
        self._test_fault = fault
        self.read, self.read_into, self._write_correct = _hot_paths(self, fault)
        self.write = self._write_correct

    # TEST ONLY, not a user option: publish the mapping before the data is written, the bug
    # the crash testbed must catch. Set from BTT8_TEST_FAULT=publish-before-data in the guest.
    @property
    def _fault_publish_before_data(self) -> bool:
        return self.write == self._write_publish_before_data

    @_fault_publish_before_data.setter
    def _fault_publish_before_data(self, on: bool) -> None:
        self.write = self._write_publish_before_data if on else self._write_correct

    @property
    def zeroed_at_open(self) -> int:
        """Entries that had the ZERO flag when the pool was opened (counted on first use)."""
        if self._zeroed_at_open < 0:
            top = self._flags_at_open
            self._zeroed_at_open = top.count(0x80) + top.count(0xC0)
        return self._zeroed_at_open

    @property
    def persist_mode(self) -> str:
        return self._pmem.persist_mode

    @property
    def _lane_count(self) -> list[int]:
        """Count per lane (a copy), derived from the next cycles."""
        return [cycle_count(cycle) - 1 for cycle in self._lane_next]

    def lane_state(self) -> tuple[list[int], list[int]]:
        """(free PBA per lane, count per lane): volatile lane state, for info/check/tests."""
        return list(self._lane_free), self._lane_count

    # -- context manager / close --------------------------------------------------------------

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pmem, self._pmem = self._pmem, None  # type: ignore[assignment]
        if pmem is not None:
            self._cycles.release()  # views of the mapping: the file cannot close under them
            self._pbas.release()
            self._blocks.release()
            pmem.close()

    # -- lanes --------------------------------------------------------------------------------

    def _acquire_lane(self) -> int:
        """Wstart's lane: the top of the free-lane stack, or the thread's pinned lane (tests pin
        lanes through _home_lane). Waits while every lane is taken (4096 writers at once)."""
        free_lanes = self._free_lanes
        lane = self._home_lane.get(threading.get_ident()) if self._home_lane else None
        if lane is not None:
            try:
                free_lanes.remove(lane)  # atomic under the GIL: either we own it or it is taken
                return lane
            except ValueError:
                pass  # taken: any other free lane will do
        while True:
            try:
                return free_lanes.pop()
            except IndexError:
                time.sleep(0)

    def _release_lane(self, lane: int) -> None:
        self._free_lanes.append(lane)

    def _wait_for_hungry_readers(self) -> None:
        while self._hungry[0]:
            time.sleep(0)

    def _check_lba(self, lba: object) -> int:
        """lba as an int; EINVAL unless it is an integer (anything with __index__, as a list
        index) in 0..nblock-1."""
        try:
            index = operator.index(lba)  # type: ignore[arg-type]
        except TypeError:
            index = -1
        if not 0 <= index < self.nblock:
            raise _einval(f"LBA {lba!r} out of range 0..{self.nblock - 1}", self.path)
        return index

    def _check_len(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) != self.bsize:
            raise _einval(f"buffer of {len(data)} bytes, block size is {self.bsize}", self.path)

    # -- read ---------------------------------------------------------------------------------

    def _copy_block(self, pba: int, buf: bytearray | memoryview) -> None:
        """RcopyBlock for any PBA word, flagged or not (read_into inlines the unflagged case)."""
        if pba & FLAG_ZERO:
            memoryview(buf)[:] = self._zero_block
        else:
            off = (pba & PBA_MASK) * self.bsize
            memoryview(buf)[:] = self._blocks[off : off + self.bsize]

    def _try_one_read(self, word: int, buf: bytearray | memoryview) -> bool:
        load8 = self._load8
        # RloadPreCycle
        pre = load8(word)
        # RloadPBA
        pba = load8(word + 1)
        # RloadLaneCycle, RpersistMapping
        if self._lane_next[pre & LANE_MASK] == pre:
            self._persist(word * 8 + 8, 8)
        # RcopyBlock
        self._copy_block(pba, buf)
        # RcheckAtomicity (the PBA too unless swaps are atomic: see _hot_paths)
        return load8(word) == pre and (self._swap_is_atomic or load8(word + 1) == pba)

    def _read_retry(self, word: int, buf: bytearray | memoryview) -> None:
        """Slow path after a failed RcheckAtomicity: retry; after HUNGRY_AFTER more failures the
        reader is hungry and writers hold off until it gets a stable copy."""
        for _ in range(HUNGRY_AFTER):
            if self._try_one_read(word, buf):
                return
        with self._hungry_lock:
            self._hungry[0] += 1
        try:
            while not self._try_one_read(word, buf):
                time.sleep(0)
        finally:
            with self._hungry_lock:
                self._hungry[0] -= 1

    # -- write --------------------------------------------------------------------------------

    def set_zero(self, lba: int) -> None:
        """Make the block read as zeros by mapping it with the ZERO flag (no data written)."""
        lba = self._check_lba(lba)
        self._wait_for_hungry_readers()
        # Wstart
        lane = self._acquire_lane()
        try:
            self._swap_mapping(lba, lane, self._lane_free[lane] | FLAG_ZERO)
        finally:
            self._release_lane(lane)

    def _swap_mapping(self, lba: int, lane: int, newpba: int) -> None:
        word = self._tt_word + 2 * lba
        # WloadOldCycle
        oldcycle = self._load8(word)
        newcycle = self._lane_next[lane]
        # WloadOldPBA
        oldpba = self._load8(word + 1)
        # WswapMapping
        if self._cas16(word, oldcycle, oldpba, newcycle, newpba):
            # WpersistMapping
            self._persist(word * 8 + 8, 8)
            # WupdateCycle
            self._lane_next[lane] = newcycle + NFREE
            # WputFreeBlock
            self._lane_free[lane] = oldpba & PBA_MASK
        else:
            # WpersistMapping (CAS lost): the entry that superseded this write is made durable
            # before the write returns (see _hot_paths' write)
            self._persist(word * 8 + 8, 8)

    def _write_publish_before_data(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """TEST ONLY (see _fault_publish_before_data): the mapping is swapped and persisted
        before the data reaches the block, so a cut in between exposes garbage."""
        lba = self._check_lba(lba)
        self._check_len(data)
        self._wait_for_hungry_readers()
        lane = self._acquire_lane()
        try:
            newpba = self._lane_free[lane]
            self._swap_mapping(lba, lane, newpba)
            # The other CPUs of a real machine run on meanwhile; under the GIL (which the
            # libpmem calls keep) no other thread would ever see this window: yield it.
            time.sleep(0)
            self._store_persist(self._dataoff + newpba * self.bsize, data)
        finally:
            self._release_lane(lane)


def _hot_paths(pool: Pool, fault: str = "") -> tuple[Callable, Callable, Callable]:
    """The production read, read_into and write, each PlusCal step labelled. btt8.steps has the
    same steps as generators for interleaving; these stay straight-line for speed: every name
    is a closure variable, table words are read through strided views (no index arithmetic),
    and the persistence interface is called through bindings taken once here."""
    bsize, dataoff, tt_word = pool.bsize, pool._dataoff, pool._tt_word
    cycles, pbas, persist = pool._cycles, pool._pbas, pool._persist
    swap_persist = pool._pmem.swap_persist
    store_flush, visible = pool._pmem.store_flush, pool._visible
    lane_next, lane_free, acquire_lane = pool._lane_next, pool._lane_free, pool._acquire_lane
    hungry, zero_block = pool._hungry, pool._zero_block
    check_lba, check_len, read_retry = pool._check_lba, pool._check_len, pool._read_retry
    pop_lane, push_lane, home_lane = pool._free_lanes.pop, pool._free_lanes.append, pool._home_lane
    tt_byte = tt_word * 8
    block0 = dataoff // bsize  # dataoff is block aligned: PBA p starts at (p + block0) * bsize
    tblocks = pool.nblock + pool.nfree
    # read_into copies into buf[whole] (a slice made once); its rare paths go through pool
    # (every closure variable a function uses costs each of its calls a copy).
    blocks, whole = pool._blocks, slice(None)
    atomic = pool._swap_is_atomic
    buffer = pool._pmem.buffer  # loads by slicing: see pmem
    as_bytes = buffer if isinstance(buffer, mmap.mmap) else None  # its slices are bytes
    help_persist = persist  # a reader's RpersistMapping
    if fault == "unpersisted-data":  # TEST ONLY: see Pool._inject_test_fault
        store_flush = pool._pmem.store
    elif fault == "unpersisted-mapping":
        swap_persist, persist, help_persist = pool._pmem.cas16, _no_persist, _no_persist
    elif fault == "cycle-shift":  # the seed's count never equals the lane count + 1 (steps.py)
        help_persist = _no_persist
    # module constants as closure variables (a cell load is cheaper than a global lookup)
    lane_mask, flag_zero, pba_mask, nfree = LANE_MASK, FLAG_ZERO, PBA_MASK, NFREE

    def read(lba: int) -> bytes:
        """The block's current content as bytes."""
        # RloadPreCycle (the LBA is checked as in read_into)
        try:
            pre = cycles[lba]
            if lba < 0:
                raise IndexError
        except (IndexError, TypeError):
            lba = check_lba(lba)  # EINVAL, or an int for an integer-like LBA
            pre = cycles[lba]
        # RloadPBA
        pba = pbas[lba]
        # RloadLaneCycle, RpersistMapping: an entry one count ahead of its lane may not be
        # durable yet (its writer is between WswapMapping and WupdateCycle): persist it.
        if lane_next[pre & lane_mask] == pre:
            help_persist(tt_byte + 16 * lba + 8, 8)
        # RcopyBlock (slicing an mmap gives bytes in one step; any other buffer: via a view).
        # Open checked every PBA against tblocks: a word below it carries no flag.
        if pba < tblocks:
            off = (pba + block0) * bsize
            data = as_bytes[off : off + bsize] if as_bytes else visible[off : off + bsize].tobytes()
        elif pba & flag_zero:
            data = zero_block
        else:
            off = dataoff + (pba & pba_mask) * bsize
            data = visible[off : off + bsize].tobytes()
        # RcheckAtomicity: the cycle is unchanged. A backend whose swap another thread may see
        # half done (cycle stored, PBA not yet: atomic_swap False) lets a reader load the new
        # cycle with the old PBA; that block is freed when the write completes and its lane's
        # next write may refill it mid-copy while the cycle still matches, so the PBA is
        # re-checked too. The built-in backends swap both halves in one C call under the GIL
        # (what cmpxchg16b gives), and the cycle alone decides, as in the spec.
        if cycles[lba] == pre and (atomic or pbas[lba] == pba):
            return data
        buf = bytearray(bsize)
        read_retry(tt_word + 2 * lba, buf)
        return bytes(buf)

    def read_into(lba: int, buf: bytearray | memoryview) -> None:
        """Copy the block into a writable buffer of exactly bsize bytes (a bytearray, or,
        fastest, a memoryview of one made once and reused)."""
        # RloadPreCycle. The table view checks the LBA as it indexes (IndexError past the end,
        # TypeError for a non-integer): only a negative LBA needs a test of its own.
        try:
            pre = cycles[lba]
            if lba < 0:
                raise IndexError
        except (IndexError, TypeError):
            lba = pool._check_lba(lba)  # EINVAL, or an int for an integer-like LBA
            pre = cycles[lba]
        # RloadPBA
        pba = pbas[lba]
        # RloadLaneCycle, RpersistMapping
        if lane_next[pre & lane_mask] == pre:
            help_persist(tt_byte + 16 * lba + 8, 8)
        # RcopyBlock (through a memoryview of buf: a bytearray's own slice assignment would
        # first copy the source into a temporary bytearray; a view the caller made once is used
        # as it is). A buffer of the wrong size makes the assignment raise ValueError: that is
        # the length check. A word below tblocks carries no flag (see read); a compare of
        # small ints is cheaper than one against the flag bit.
        try:
            if pba < tblocks:
                off = pba * bsize
                if type(buf) is memoryview:
                    buf[whole] = blocks[off : off + bsize]
                else:
                    memoryview(buf)[whole] = blocks[off : off + bsize]
            else:
                pool._copy_block(pba, buf)
        except ValueError:
            pool._check_len(buf)  # EINVAL if that was the cause
            raise
        # RcheckAtomicity (the cycle; the PBA too unless swaps are atomic: see read)
        if cycles[lba] != pre or not (atomic or pbas[lba] == pba):
            pool._read_retry(tt_word + 2 * lba, buf)

    def write(lba: int, data: bytes | bytearray | memoryview) -> None:
        """Atomically replace the block (bytes is the fastest argument type)."""
        if len(data) != bsize:
            check_len(data)
        if hungry[0]:
            pool._wait_for_hungry_readers()
        # Wstart: claim a lane and its free block
        if home_lane:
            lane = acquire_lane()
        else:
            try:
                lane = pop_lane()
            except IndexError:
                lane = acquire_lane()
        try:
            newpba = lane_free[lane]
            # WwriteBlock: copy the data into the free block and persist it. The persistence
            # layer may leave the wait for the copy to the fence that opens swap_persist (the
            # block is then durable before the mapping to it can be): the loads between need
            # no fence, and the copy drains while they run.
            store_flush((newpba + block0) * bsize, data)
            # WloadOldCycle. The table view checks the LBA as it indexes (as in read_into); a
            # bad LBA leaves only the lane's free block written, which nothing maps.
            try:
                oldcycle = cycles[lba]
                if lba < 0:
                    raise IndexError
            except (IndexError, TypeError):
                lba = check_lba(lba)  # EINVAL, or an int for an integer-like LBA
                oldcycle = cycles[lba]
            newcycle = lane_next[lane]
            # WloadOldPBA
            oldpba = pbas[lba]
            # WswapMapping, then WpersistMapping if it swapped: one interface call (fence,
            # cas16, then persist of the PBA half; its cycle shares the cache line, entries
            # being 16-byte aligned, so recovery sees the cycle that goes with the PBA)
            if swap_persist(tt_word + 2 * lba, oldcycle, oldpba, newcycle, newpba):
                # WupdateCycle: the lane's count + 1 (its next cycle moves on by one count)
                lane_next[lane] = newcycle + nfree
                # WputFreeBlock: the old block becomes this lane's free block
                lane_free[lane] = oldpba & pba_mask
            else:
                # WpersistMapping (CAS lost to a concurrent writer): this write returns as
                # linearized just before the one that superseded it, whose entry may not be
                # durable yet (its writer between WswapMapping and WpersistMapping): persist it
                # before acknowledging, or a cut could roll the LBA back behind this write.
                # WputFreeBlock: the lane keeps its block
                persist(tt_byte + 16 * lba + 8, 8)
        finally:
            push_lane(lane)

    return read, read_into, write


# ---------------------------------------------------------------------------------------------
# libpmemblk-style entry points


def _no_persist(off: int, n: int) -> None:
    pass


def _wrap_os_error(exc: OSError, path: str) -> Btt8Error:
    if isinstance(exc, Btt8Error):
        return exc
    return Btt8Error(exc.errno or errno.EIO, exc.strerror or str(exc), path)


def create(path: str, bsize: int, poolsize: int = 0, mode: int = 0o644, *,
           persistence: str = "eadr", seed: int = 0) -> Pool:
    """Create and open a pool. A regular file must not exist (EEXIST) and needs poolsize; an
    existing character/block device (e.g. /dev/dax0.0) is formatted in place, its whole size
    used when poolsize is 0. persistence: the model the pool runs under (btt8.pmem.with_model:
    eadr, the mapping itself, is the default; adr / adr-evict put a write-back cache model in
    front of it, seeded by seed)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _wrap_os_error(exc, path) from None
    is_device = st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
    if st is not None and not is_device:
        raise Btt8Error(errno.EEXIST, "pool already exists", path)
    if not is_device:
        Layout.for_pool(bsize, poolsize)  # validate before creating anything
    try:
        pmem: Pmem = MappedPmem(path, create_size=0 if is_device else poolsize, mode=mode)
    except OSError as exc:
        raise _wrap_os_error(exc, path) from None
    try:
        pmem = with_model(pmem, persistence, seed)
        size = poolsize if is_device and poolsize else pmem.size
        if size > pmem.size:
            raise _einval(f"pool size {size} larger than the device ({pmem.size})", path)
        lay = Layout.for_pool(bsize, size)
        format_pool(pmem, lay)
        return Pool(pmem, path)
    except BaseException as exc:
        _close_after_failure(pmem, exc)
        if not is_device:
            os.unlink(path)
        raise


def create_on(pmem: Pmem, bsize: int) -> Pool:
    """Format any persistence backend (e.g. MemoryPmem for tests) as a whole pool and open it."""
    format_pool(pmem, Layout.for_pool(bsize, pmem.size))
    return Pool(pmem)


def open(path: str, bsize: int = 0, *, readonly: bool = False, persistence: str = "eadr",
         seed: int = 0) -> Pool:
    """Open a pool and recover its free list. bsize 0 accepts the pool's block size; otherwise it
    must match (EINVAL). A failed open never writes to the pool. readonly opens with a shared
    lock and a read-only mapping (for check/info): writes then fail. persistence and seed: the
    persistence model, as for create (ignored when readonly: nothing is stored)."""
    path = os.fspath(path)
    try:
        pmem: Pmem = MappedPmem(path, readonly=readonly)
    except OSError as exc:
        raise _wrap_os_error(exc, path) from None
    pool = None
    try:
        if not readonly:
            pmem = with_model(pmem, persistence, seed)
        if pmem.size < MIN_POOL:
            raise _einval(f"pool size {pmem.size} below the 16 MiB minimum", path)
        pool = Pool(pmem, path)
        if bsize and bsize != pool.bsize:
            raise _einval(f"pool block size is {pool.bsize}, not {bsize}", path)
        if readonly:
            pool.write = pool.set_zero = _read_only  # type: ignore[method-assign,assignment]
        return pool
    except BaseException as exc:
        if pool is None:
            _close_after_failure(pmem, exc)
        else:
            pool.close()  # also drops the pool's views of the mapping
        raise


def _close_after_failure(pmem: Pmem, exc: BaseException) -> None:
    """Close a mapping whose open failed. The frames of the traceback may still hold views of
    it (recovery's strided views of the table) and a mapping cannot close under a view:
    clearing those frames' locals drops them."""
    traceback.clear_frames(exc.__traceback__)
    pmem.close()


def _read_only(*_args: object) -> None:
    raise Btt8Error(errno.EROFS, "pool opened read-only")


def check(path: str, bsize: int = 0) -> dict[str, object]:
    """Read-only consistency check of a pool: superblock sane, every mapped PBA in range and
    used once, exactly nfree free blocks (the recovery scan of a read-only open, which takes a
    shared lock and never writes). Raises CorruptionError on an inconsistent pool, Btt8Error
    (ENOENT, EINVAL for a bsize mismatch, EBUSY, ...) when it cannot look; otherwise returns a
    summary dict."""
    with open(path, bsize, readonly=True) as pool:
        lay = pool.layout
        free, counts = pool.lane_state()  # open's recovery scan raised if the map is bad
        return {
            "ok": True, "path": os.fspath(path), "signature": SIG.rstrip(b"\0").decode(),
            "bsize": lay.bsize, "nblocks": lay.nblocks, "nfree": lay.nfree, "ttoff": lay.ttoff,
            "dataoff": lay.dataoff, "pool_size": pool._pmem.size, "data_blocks": lay.tblocks,
            "free_blocks": len(free), "zeroed_entries": pool.zeroed_at_open,
            "lanes_used": sum(1 for c in counts if c), "max_lane_count": max(counts),
            "persist_mode": pool.persist_mode,
        }
