"""A BTT8 pool as an NBD export: the block-level verbs nbdkit's Python plugin calls.

    export = Export(btt8.open(path, bsize))
    export.pread(buf, offset)       # fills buf (a writable buffer) from the pool
    export.pwrite(buf, offset)      # one BTT8 write per block: each block is atomic
    export.zero(count, offset)      # BTT8 set_zero per whole block (write-zeroes)
    export.trim(count, offset)      # set_zero too (a trimmed block reads as zeros)
    export.flush()                  # nothing to do: a BTT8 write is durable when it returns

Requests must be aligned to the pool's block size: the kernel NBD client is told that the
logical (and physical) block size is the BTT8 block size, so it never sends anything else. An
unaligned read or write is refused with EINVAL rather than emulated with a read-modify-write,
which would not be atomic. Zero and trim of a partial block are the exception NBD clients may
legitimately send: zero writes the partial block's zeros through a read-modify-write, trim
(advisory) leaves a partial block alone.

Threads: the pool is thread-safe and every write takes a BTT8 lane, so several NBD
connections and nbdkit threads write in parallel (as far as the GIL lets them).

stdlib only: runs inside nbdkit (its `python` plugin) in the guest, and in host tests.
"""

from __future__ import annotations

import errno
from typing import Protocol


class PoolLike(Protocol):
    bsize: int
    nblock: int

    def read_into(self, lba: int, buf: memoryview) -> None: ...
    def write(self, lba: int, data: memoryview | bytes) -> None: ...
    def set_zero(self, lba: int) -> None: ...
    def close(self) -> None: ...


class Export:
    def __init__(self, pool: PoolLike) -> None:
        self.pool = pool
        self.bsize = pool.bsize
        self.size = pool.nblock * pool.bsize

    def _blocks(self, count: int, offset: int, what: str) -> range:
        """The LBAs of an aligned request; EINVAL when unaligned or past the end."""
        bs = self.bsize
        if offset % bs or count % bs:
            raise OSError(errno.EINVAL, f"{what} of {count} bytes at {offset} is not aligned "
                                        f"to the {bs}-byte block size")
        if offset < 0 or offset + count > self.size:
            raise OSError(errno.EINVAL, f"{what} of {count} bytes at {offset} is past the end "
                                        f"({self.size} bytes)")
        return range(offset // bs, (offset + count) // bs)

    def pread(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        bs, read_into = self.bsize, self.pool.read_into
        for i, lba in enumerate(self._blocks(len(view), offset, "read")):
            read_into(lba, view[i * bs:(i + 1) * bs])

    def pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        bs, write = self.bsize, self.pool.write
        for i, lba in enumerate(self._blocks(len(view), offset, "write")):
            write(lba, view[i * bs:(i + 1) * bs])

    def zero(self, count: int, offset: int) -> None:
        """Write zeroes: whole blocks become ZERO entries; a partial head or tail block is
        read, zeroed in part and written back (one atomic block write)."""
        for lba, lo, hi in self._spans(count, offset):
            if lo == 0 and hi == self.bsize:
                self.pool.set_zero(lba)
            else:
                block = bytearray(self.bsize)
                self.pool.read_into(lba, memoryview(block))
                block[lo:hi] = bytes(hi - lo)
                self.pool.write(lba, memoryview(block))

    def trim(self, count: int, offset: int) -> None:
        """Discard: whole blocks only (a trim is a hint; a partial block keeps its data)."""
        for lba, lo, hi in self._spans(count, offset):
            if lo == 0 and hi == self.bsize:
                self.pool.set_zero(lba)

    def flush(self) -> None:
        """Every write and set_zero persisted its block and its map entry before returning."""

    def _spans(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        """(lba, first byte, end byte) of each block a byte range touches."""
        if count < 0 or offset < 0 or offset + count > self.size:
            raise OSError(errno.EINVAL, f"range of {count} bytes at {offset} is past the end "
                                        f"({self.size} bytes)")
        bs, out, pos, end = self.bsize, [], offset, offset + count
        while pos < end:
            lba, lo = divmod(pos, bs)
            hi = min(bs, lo + end - pos)
            out.append((lba, lo, hi))
            pos += hi - lo
        return out

    def close(self) -> None:
        self.pool.close()
