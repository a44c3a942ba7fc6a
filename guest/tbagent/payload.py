"""Self-describing blocks and deterministic op sequences (stdlib only; the host imports it too).

Block layout (little-endian), HEADER_SIZE = 64 bytes, then the fill up to bsize:
    magic 8s | seed Q | lba Q | epoch I | thread I | op Q | bsize I | reserved I | checksum 16s
The fill is a 4 KiB SHAKE-128 chunk keyed by (seed, lba, epoch, thread, op), repeated to the end
of the block, so any block can be regenerated from the scenario seed. The checksum is BLAKE2b-128
over the header (checksum field excluded) and that chunk; the rest of the block must repeat the
chunk exactly. A block that mixes bytes of two writes, or of a write and zeros, fails one of the
two. Repeating one chunk rather than hashing the whole block keeps a 1 MiB write's payload cheap in
the guest (TCG Python spent ~29 ms generating it for a ~4 ms pwrite), so more of the workload's
time is spent in the copy that a power cut can tear.

Write ids are (epoch, thread, op): epoch = the cut round the write was issued in, so ids stay
unique across cuts even if the host missed the last events of a round and resumes op indexes
too low. Op indexes still continue across rounds through the per-thread `resume` offsets, so a
thread's whole campaign is one deterministic sequence op_at(seed, thread, 0, 1, 2, ...).
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

MAGIC = b"TBBLOCK1"
_HEAD = struct.Struct("<8sQQIIQII")
CHECKSUM_SIZE = 16
HEADER_SIZE = _HEAD.size + CHECKSUM_SIZE
assert HEADER_SIZE == 64

KINDS = ("read", "write", "zero")


class WriteId(NamedTuple):
    epoch: int
    thread: int
    op: int


class Decoded(NamedTuple):
    """What a block holds: 'zero', 'write' (write_id), 'torn' (nothing valid; digest
    identifies the garbage) or 'phantom' (a valid block of another lba or seed)."""

    kind: str
    write_id: WriteId | None = None
    other_lba: int | None = None
    digest: str | None = None

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.write_id is not None:
            out["write_id"] = list(self.write_id)
        if self.other_lba is not None:
            out["lba"] = self.other_lba
        if self.digest is not None:
            out["digest"] = self.digest
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Decoded:
        wid = obj.get("write_id")
        return cls(
            obj["kind"],
            WriteId(*wid) if wid is not None else None,
            obj.get("lba"),
            obj.get("digest"),
        )


ZERO = Decoded("zero")


CHUNK = 4096


def _chunk(seed: int, lba: int, wid: WriteId, size: int) -> bytes:
    key = struct.pack("<QQIIQ", seed, lba, wid.epoch, wid.thread, wid.op)
    return hashlib.shake_128(key).digest(min(size, CHUNK))


def _repeat(chunk: bytes, size: int) -> bytes:
    return (chunk * -(-size // len(chunk)))[:size] if chunk else b""


def make_block(seed: int, lba: int, wid: WriteId, bsize: int) -> bytes:
    """The one block write `wid` stores at `lba`; identical every time it is regenerated."""
    head = _HEAD.pack(MAGIC, seed, lba, wid.epoch, wid.thread, wid.op, bsize, 0)
    chunk = _chunk(seed, lba, wid, bsize - HEADER_SIZE)
    checksum = hashlib.blake2b(head + chunk, digest_size=CHECKSUM_SIZE).digest()
    return head + checksum + _repeat(chunk, bsize - HEADER_SIZE)


def decode_block(data: bytes | bytearray | memoryview, seed: int, lba: int) -> Decoded:
    data = bytes(data)
    if data.count(0) == len(data):
        return ZERO
    magic, b_seed, b_lba, epoch, thread, op, bsize, _ = _HEAD.unpack_from(data)
    checksum = data[_HEAD.size : HEADER_SIZE]
    chunk = data[HEADER_SIZE : HEADER_SIZE + CHUNK]
    valid = (
        magic == MAGIC
        and bsize == len(data)
        and hashlib.blake2b(data[: _HEAD.size] + chunk, digest_size=CHECKSUM_SIZE).digest()
        == checksum
        and data[HEADER_SIZE:] == _repeat(chunk, len(data) - HEADER_SIZE)
    )
    if not valid:
        return Decoded("torn", digest=hashlib.blake2b(data, digest_size=8).hexdigest())
    wid = WriteId(epoch, thread, op)
    if b_seed != seed or b_lba != lba:
        return Decoded("phantom", wid, other_lba=b_lba)
    return Decoded("write", wid)


def op_at(seed: int, thread: int, index: int, lbas: int, mix: dict[str, float]) -> tuple[str, int]:
    """Op `index` of `thread`: (kind, lba). Random access, so the host can regenerate any op."""
    h = hashlib.blake2b(struct.pack("<QQQ", seed, thread, index), digest_size=16).digest()
    pick, where = struct.unpack("<QQ", h)
    total = sum(mix.get(k, 0.0) for k in KINDS)
    point = pick / 2**64 * total
    kind = KINDS[-1]
    for k in KINDS:
        weight = mix.get(k, 0.0)
        if point < weight:
            kind = k
            break
        point -= weight
    while mix.get(kind, 0.0) <= 0:  # float rounding at the top end must not pick a 0-weight kind
        kind = KINDS[KINDS.index(kind) - 1]
    return kind, where % lbas
