"""Persistence layer: the only way the BTT8 core touches persistent memory.

Every core access goes through a `Pmem` object so that other backends (a tracing backend that
logs stores/flushes/fences, a write-back-cache backend whose unflushed lines are lost at a cut)
can be slotted in without touching the core.

Interface (offsets are bytes from the start of the pool; 8-byte operations take a *word index*,
i.e. byte offset // 8, so that the mmap backend can hand out C-level bound methods and the hot
path never runs a Python frame for them):

    size                          pool size in bytes
    visible                       memoryview of the cache-coherent contents, for block loads
                                  on the read hot path (saves a Python frame per read). Loads
                                  only: every store, flush and fence goes through the methods,
                                  so a tracing backend sees them all and a write-back-cache
                                  backend keeps this view on its DRAM copy (what loads observe)
    visible_words                 visible cast to 'Q': word-indexed 8-byte loads by subscript
                                  (one load each; cheaper than calling load8)
    load(off, n) -> bytes         copy n bytes out
    load_into(off, buf)           copy len(buf) bytes into a writable buffer
    store(off, data)              copy data in (not persisted)
    store_persist(off, data)      copy data in and persist it (pmem_memcpy_persist)
    load8(word) -> int            aligned 8-byte load (one load)
    store8(word, value)           aligned 8-byte store (one store)
    cas16(word, old_lo, old_hi, new_lo, new_hi) -> bool
                                  16-byte compare-and-swap of the entry at word (16-aligned)
    persist(off, n)               flush the range to the persistence domain
    fence()                       order earlier persists before later stores
    close()

About cas16: Python has no cmpxchg16b. The emulation holds one of a set of striped locks keyed by
the entry index (= LBA for the translation table), compares both halves, then stores the low half
(the cycle) before the high half (the PBA). Lock-free readers load the cycle before the PBA and
re-check both afterwards: a reader that sees the new PBA has seen the new cycle or sees it at its
re-check, and one that saw the new cycle with the old PBA (the state between the two stores, which
a real cmpxchg16b never exposes) sees the PBA move at its re-check before trusting a copy of a
block that the write has meanwhile freed. The swap takes effect, for readers, at the PBA store.
Writers always go through cas16, so the emulation is correct across the threads of one process.
Processes are kept apart by an exclusive flock taken at open.

Persisting: when PMDK's libpmem.so.1 loads, ranges that are pmem (a devdax device, or
pmem_is_pmem() true, which honours PMEM_IS_PMEM_FORCE=1) are persisted with pmem_persist /
pmem_memcpy_persist (cache-line flush + fence). Otherwise persist falls back to msync(2) of the
covering pages, which is what makes a regular file durable; without libpmem on a devdax device
there is no portable way to flush CPU caches from Python and the layer relies on the platform
(eADR) — `persist_mode` says which of these is in effect.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable

# Number of striped locks for the cas16 emulation: enough that 8-64 threads rarely collide.
CAS_STRIPES = 256
DEVDAX_ALIGN = 2 << 20

_libpmem: ctypes.CDLL | None = None
_libpmem_tried = False


def libpmem() -> ctypes.CDLL | None:
    """libpmem.so.1 with argtypes set, or None; loaded lazily so that callers (the benchmark) can
    set PMEM_IS_PMEM_FORCE before libpmem reads it in its constructor."""
    global _libpmem, _libpmem_tried
    if not _libpmem_tried:
        _libpmem_tried = True
        try:
            lib = ctypes.CDLL("libpmem.so.1")
        except OSError:
            return None
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.pmem_persist.argtypes = [vp, sz]
        lib.pmem_persist.restype = None
        lib.pmem_memcpy_persist.argtypes = [vp, vp, sz]
        lib.pmem_memcpy_persist.restype = vp
        lib.pmem_is_pmem.argtypes = [vp, sz]
        lib.pmem_is_pmem.restype = ctypes.c_int
        lib.pmem_drain.argtypes = []
        lib.pmem_drain.restype = None
        _libpmem = lib
    return _libpmem


class PoolBusyError(OSError):
    """Another process (or another open in this process) holds the pool."""


class Pmem:
    """Shared implementation over a writable buffer; subclasses decide how it is persisted."""

    size: int
    persist_mode: str

    def __init__(self, buf: mmap.mmap | bytearray, readonly: bool = False) -> None:
        self._buf = buf
        self.size = len(buf)
        mv = memoryview(buf)
        if readonly:
            mv = mv.toreadonly()
        self._mv = self.visible = mv
        self._q = self.visible_words = mv.cast("Q")
        self._stripes = [threading.Lock() for _ in range(CAS_STRIPES)]
        # C-level bound methods: calling them costs no Python frame on the hot path.
        self.load8: Callable[[int], int] = self._q.__getitem__
        self.store8: Callable[[int, int], None] = self._q.__setitem__

    def load(self, off: int, n: int) -> bytes:
        return self._buf[off : off + n]

    def load_into(self, off: int, buf: bytearray | memoryview) -> None:
        buf[:] = self._mv[off : off + len(buf)]

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        self.persist(off, len(data))

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        q = self._q
        with self._stripes[(word >> 1) & (CAS_STRIPES - 1)]:
            if q[word] != old_lo or q[word + 1] != old_hi:
                return False
            q[word] = new_lo  # cycle first, PBA second: see the module docstring
            q[word + 1] = new_hi
            return True

    def persist(self, off: int, n: int) -> None:
        raise NotImplementedError

    def fence(self) -> None:
        """Python executes stores in program order; the persists already end in a fence."""

    def close(self) -> None:
        self.load8 = self.store8 = _closed  # type: ignore[assignment]
        self._q.release()
        self._mv.release()


def _closed(*_args: object) -> None:
    raise ValueError("pool is closed")


class MemoryPmem(Pmem):
    """Volatile pool in a bytearray, for unit tests. Everything stored is already 'persistent'."""

    persist_mode = "memory"

    def __init__(self, size: int) -> None:
        super().__init__(bytearray(size))

    def persist(self, off: int, n: int) -> None:
        pass

    def snapshot(self) -> bytes:
        return bytes(self._buf)


class MappedPmem(Pmem):
    """mmap of a regular file, a block device or a devdax character device (/dev/daxN.M)."""

    def __init__(self, path: str, *, readonly: bool = False, create_size: int = 0,
                 mode: int = 0o644) -> None:
        self.path = path
        self.fd = -1
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create_size:
            flags |= os.O_CREAT | os.O_EXCL
        self.fd = os.open(path, flags | os.O_CLOEXEC, mode)
        self.created = bool(create_size)
        try:
            _lock(self.fd, path, shared=readonly)
            st = os.fstat(self.fd)
            self.is_devdax = stat.S_ISCHR(st.st_mode)
            self.is_device = self.is_devdax or stat.S_ISBLK(st.st_mode)
            if create_size and not self.is_device:
                os.posix_fallocate(self.fd, 0, create_size)
            size = pool_size(self.fd, path)
            if size == 0:
                raise OSError(errno.EINVAL, "pool is empty", path)
            prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
            buf = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(self.fd)
            if create_size:
                os.unlink(path)
            raise
        super().__init__(buf, readonly)
        if readonly:
            # Nothing is ever stored through a read-only pool, so there is nothing to persist.
            self.persist_mode = "read-only"
            self.persist = _no_persist  # type: ignore[method-assign]
            return
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if self.is_devdax and self._base % DEVDAX_ALIGN:
            self.close()
            raise OSError(errno.EINVAL, f"devdax mapping at {self._base:#x} is not 2 MiB aligned",
                          path)
        self._choose_persist()

    def _choose_persist(self) -> None:
        lib = libpmem()
        if lib is not None and (self.is_devdax or lib.pmem_is_pmem(self._base, self.size)):
            self.persist_mode = "libpmem"
            base, flush, copy = self._base, lib.pmem_persist, lib.pmem_memcpy_persist
            fallback_copy = super().store_persist

            def persist(off: int, n: int) -> None:
                flush(base + off, n)

            def store_persist(off: int, data: bytes | bytearray | memoryview) -> None:
                if type(data) is bytes:  # ctypes passes bytes as a pointer without a copy
                    copy(base + off, data, len(data))
                else:
                    fallback_copy(off, data)

            self.persist = persist  # type: ignore[method-assign]
            self.store_persist = store_persist  # type: ignore[method-assign]
            self.fence = lib.pmem_drain  # type: ignore[method-assign]
        elif self.is_devdax:
            self.persist_mode = "none (devdax without libpmem: relies on eADR)"
            self.persist = _no_persist  # type: ignore[method-assign]
        else:
            self.persist_mode = "msync"

    def persist(self, off: int, n: int) -> None:
        # msync fallback: mmap.flush needs a page-aligned offset.
        start = off & ~(mmap.PAGESIZE - 1)
        self._buf.flush(start, off + n - start)

    def close(self) -> None:
        if self.fd < 0:
            return
        super().close()
        self._buf.close()
        os.close(self.fd)  # also drops the flock
        self.fd = -1


def _no_persist(off: int, n: int) -> None:
    pass


def _lock(fd: int, path: str, shared: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PoolBusyError(errno.EBUSY, "pool is in use by another process (flock held)",
                            path) from None


def pool_size(fd: int, path: str, st: os.stat_result | None = None) -> int:
    """Usable size: file size, block device size, or a devdax device's sysfs size."""
    st = st or os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if stat.S_ISCHR(st.st_mode):
        return devdax_size(os.major(st.st_rdev), os.minor(st.st_rdev), path)
    raise OSError(errno.EINVAL, "not a file or device", path)


def devdax_size(major: int, minor: int, path: str = "", sysfs: str = "/sys") -> int:
    """Size of a devdax device, rounded down to its alignment (mappings must cover whole 2 MiB
    pages; the kernel's devdax get_unmapped_area aligns the address for us)."""
    base = f"{sysfs}/dev/char/{major}:{minor}"
    try:
        with open(f"{base}/size") as f:
            size = int(f.read())
    except OSError:
        raise OSError(errno.ENODEV, f"no devdax size in {base}/size", path) from None
    align = DEVDAX_ALIGN
    for name in ("align", "device/align"):
        try:
            with open(f"{base}/{name}") as f:
                align = int(f.read())
            break
        except (OSError, ValueError):
            continue
    return size - size % align
