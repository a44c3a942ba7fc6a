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
    buffer                        the object under visible (an mmap or a bytearray), for
                                  loads by slicing (a block as bytes in one step from an mmap).
                                  Loads only, like visible
    load(off, n) -> bytes         copy n bytes out
    load_into(off, buf)           copy len(buf) bytes into a writable buffer
    store(off, data)              copy data in (not persisted)
    store_persist(off, data)      copy data in and persist it (pmem_memcpy_persist)
    store_flush(off, data)        copy data in and flush it: durable once the next fence (or
                                  swap_persist, which opens with one) returns. The base class
                                  persists at once (store_persist); the libpmem backend copies
                                  with non-temporal stores and leaves the wait for them to
                                  that fence (pmem_memcpy_nodrain), so the copy drains while
                                  the writer goes on with its loads
    load8(word) -> int            aligned 8-byte load (one load)
    store8(word, value)           aligned 8-byte store (one store)
    cas16(word, old_lo, old_hi, new_lo, new_hi) -> bool
                                  16-byte compare-and-swap of the entry at word (16-aligned)
    atomic_swap                   True when no thread can see half of a cas16 (see below)
    swap_persist(word, old_lo, old_hi, new_lo, new_hi) -> bool
                                  fence, cas16, then (if it swapped) persist the high half:
                                  BTT8's WswapMapping + WpersistMapping as one call, the fence
                                  making a store_flush-ed block durable before the mapping to
                                  it can be. The base class composes fence, cas16 and persist,
                                  so a backend that overrides those sees all three; the libpmem
                                  backend fuses them (one Python frame)
    persist(off, n)               flush the range to the persistence domain
    fence()                       order earlier persists before later stores
    close()

About cas16: Python has no cmpxchg16b. The emulation holds one of a set of striped mutexes keyed
by the entry index (= LBA for the translation table), compares both halves, then stores both in
ONE C call: struct.pack_into with the native "QQ" format, which memcpy's each half as one aligned
8-byte store (one mov: atomic on media) - low half (the cycle) first, then the high half (the
PBA). Other Python threads only run while holding the GIL, and pack_into never releases it, so no
thread ever sees an entry with one half swapped (cmpxchg16b's guarantee, for this process;
processes are kept apart by an exclusive flock taken at open). `atomic_swap` says so; it is False
for a subclass that overrides cas16 (a test or tracing backend may split the stores), and then
readers re-check the PBA as well as the cycle (see btt8.core). At a power cut the two halves are
two 8-byte stores, like any 16-byte store on x86: either may be durable without the other, which
recovery tolerates (it builds the map from the PBA halves; a cycle only raises its lane's count).
A mutex is a one-item list: list.pop() takes it and list.append() gives it back, each a single C
call and so atomic under the GIL (a threading.Lock costs four times as much here); a writer that
finds it empty yields the GIL until the holder is done. The compare and the store are separate
bytecodes, so writers do need the mutex; readers never take it.

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
import struct
import time
from collections.abc import Callable
from itertools import repeat

# Number of striped mutexes for the cas16 emulation: enough that 8-64 threads rarely collide.
CAS_STRIPES = 256
# Native byte order and size: each field is packed with one memcpy of 8 bytes (an aligned mov),
# never byte by byte (the standard-size "<QQ" packs bytes one at a time: a torn word on media).
_PAIR = struct.Struct("QQ")
DEVDAX_ALIGN = 2 << 20

# ctypes passes a Python int without argtypes as a C int: sizes below this go the fast way.
_FAST_LEN = 1 << 31

_libpmem: ctypes.CDLL | None = None
_libpmem_raw: ctypes.PyDLL | None = None
_libpmem_tried = False


def libpmem() -> ctypes.CDLL | None:
    """libpmem.so.1 with argtypes set, or None; loaded lazily so that callers (the benchmark) can
    set PMEM_IS_PMEM_FORCE before libpmem reads it in its constructor."""
    global _libpmem, _libpmem_raw, _libpmem_tried
    if not _libpmem_tried:
        _libpmem_tried = True
        try:
            lib = ctypes.CDLL("libpmem.so.1")
            raw = ctypes.PyDLL("libpmem.so.1")
        except OSError:
            return None
        # The hot-path handle: PyDLL keeps the GIL (no release/re-acquire around a sub-microsecond
        # call) and its functions have no argtypes, so ctypes converts nothing: callers pass a
        # ctypes.byref pointer and a small int (_FAST_LEN). ~90 ns less per call than argtypes.
        for name in ("pmem_persist", "pmem_memcpy_persist", "pmem_memcpy_nodrain", "pmem_drain"):
            getattr(raw, name).restype = None
        _libpmem_raw = raw
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
        self._buf = self.buffer = buf
        self.size = len(buf)
        mv = memoryview(buf)
        if readonly:
            mv = mv.toreadonly()
        self._mv = self.visible = mv
        self._q = self.visible_words = mv.cast("Q")
        self._stripes: list[list[None]] = list(map(list, repeat((None,), CAS_STRIPES)))
        # C-level bound methods: calling them costs no Python frame on the hot path.
        self.load8: Callable[[int], int] = self._q.__getitem__
        self.store8: Callable[[int, int], None] = self._q.__setitem__

    def load(self, off: int, n: int) -> bytes:
        return bytes(self._buf[off : off + n])  # an mmap slice is bytes already: no copy

    def load_into(self, off: int, buf: bytearray | memoryview) -> None:
        buf[:] = self._mv[off : off + len(buf)]

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        self.persist(off, len(data))

    def store_flush(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.store_persist(off, data)

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        q = self._q
        stripe = self._stripes[(word >> 1) & (CAS_STRIPES - 1)]
        try:
            stripe.pop()
        except IndexError:
            _take_stripe(stripe)
        try:
            if q[word] != old_lo or q[word + 1] != old_hi:
                return False
            _PAIR.pack_into(self._mv, word * 8, new_lo, new_hi)  # one C call: module docstring
            return True
        finally:
            stripe.append(None)

    @property
    def atomic_swap(self) -> bool:
        """cas16 stores both halves in one C call (no Python thread sees half a swap)."""
        return type(self).cas16 is Pmem.cas16

    def swap_persist(self, word: int, old_lo: int, old_hi: int, new_lo: int,
                     new_hi: int) -> bool:
        self.fence()
        if self.cas16(word, old_lo, old_hi, new_lo, new_hi):
            self.persist(word * 8 + 8, 8)
            return True
        return False

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


def _take_stripe(stripe: list[None]) -> None:
    """Slow path of a cas16 stripe mutex: another thread holds it (it is between two bytecodes
    of its cas16); yield the GIL until it gives the mutex back."""
    while True:
        time.sleep(0)
        try:
            stripe.pop()
            return
        except IndexError:
            pass


class MemoryPmem(Pmem):
    """Volatile pool in a bytearray, for unit tests. Everything stored is already 'persistent'."""

    persist_mode = "memory"

    def __init__(self, size: int | bytes) -> None:
        super().__init__(bytearray(size))

    def persist(self, off: int, n: int) -> None:
        pass

    def snapshot(self) -> bytes:
        return bytes(self._buf)


PERSISTENCE_MODELS = ("eadr", "adr", "adr-evict")
LINE = 64  # cache line: the unit a persist (clwb) and an eviction write back
_LINE_SHIFT = 6


class CachePmem(Pmem):
    """Write-back-cache persistence model over a media backend (`adr` / `adr-evict`).

    Loads, `visible` and `buffer` come from a DRAM copy of the media; stores go to the DRAM
    copy only; `persist(off, n)` writes the covering 64-byte lines through to the media (the
    whole line, as clwb does, whoever dirtied it). Whatever was not written through is lost when
    the process (the guest) dies: the media then holds exactly the persisted lines - the ADR
    model, where the CPU caches are outside the persistence domain. A write-through copies a line
    with one memcpy, which moves aligned 8-byte words: 8-byte aligned stores stay atomic,
    nothing larger is (a cas16's halves may reach the media one without the other).

    `adr-evict` adds cache pressure: after each store, with probability `evict_p`, one dirty line
    picked by a seeded random generator is written back early (in any order). Only that mode
    tracks dirty lines; `adr` needs no tracking (the media holds the persisted lines already).

    close() writes every line back (a clean shutdown flushes the caches); crash() instead drops
    the DRAM copy and returns the media image (in-process power cut, for tests)."""

    def __init__(self, media: Pmem, model: str = "adr", seed: int = 0,
                 evict_p: float = 0.25) -> None:
        if model not in ("adr", "adr-evict"):
            raise ValueError(f"persistence model {model!r}: expected adr or adr-evict")
        self.media = media
        self.model = model
        self.persist_mode = f"{model} (write-back cache model over {media.persist_mode})"
        self._media_mv = media.visible
        dram = bytearray(media.visible)
        super().__init__(dram)
        self._dirty_list: list[int] | None = None
        if model == "adr-evict":
            import random
            self._rng = random.Random(seed)
            self._evict_p = evict_p
            self._dirty_list = []
            self._dirty_pos: dict[int, int] = {}
            dram_q = self.visible_words

            def store8(word: int, value: int) -> None:
                dram_q[word] = value
                self._dirtied(word << 3, 8)

            self.store8 = store8

    @property
    def atomic_swap(self) -> bool:
        """The DRAM copy is swapped in one C call under the stripe mutex, as in Pmem.cas16."""
        return True

    # -- dirty tracking (adr-evict only) ------------------------------------------------------

    def _dirtied(self, off: int, n: int) -> None:
        dl = self._dirty_list
        if dl is None:
            return
        pos = self._dirty_pos
        for line in range(off >> _LINE_SHIFT, (off + n + LINE - 1) >> _LINE_SHIFT):
            if line not in pos:
                pos[line] = len(dl)
                dl.append(line)
        if dl and self._rng.random() < self._evict_p:
            self._write_back(dl[self._rng.randrange(len(dl))])

    def _write_back(self, line: int) -> None:
        off = line << _LINE_SHIFT
        self._media_mv[off : off + LINE] = self._mv[off : off + LINE]
        dl = self._dirty_list
        if dl is not None:
            i = self._dirty_pos.pop(line, -1)
            if i >= 0:
                last = dl.pop()
                if last != line:
                    dl[i] = last
                    self._dirty_pos[last] = i

    # -- the interface ------------------------------------------------------------------------

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        if self._dirty_list is not None:
            self._dirtied(off, len(data))

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        self.persist(off, len(data))

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        if super().cas16(word, old_lo, old_hi, new_lo, new_hi):
            if self._dirty_list is not None:
                self._dirtied(word << 3, 16)
            return True
        return False

    def persist(self, off: int, n: int) -> None:
        start = off & -LINE
        end = min((off + n + LINE - 1) & -LINE, self.size)
        self._media_mv[start:end] = self._mv[start:end]
        if self._dirty_list:
            for line in range(start >> _LINE_SHIFT, end >> _LINE_SHIFT):
                if line in self._dirty_pos:
                    self._write_back(line)
        self.media.persist(start, end - start)

    def write_back_all(self) -> None:
        self._media_mv[:] = self._mv
        if self._dirty_list is not None:
            self._dirty_list.clear()
            self._dirty_pos.clear()
        self.media.persist(0, self.size)

    def crash(self) -> bytes:
        """Power cut, in process: the DRAM copy is lost; returns the media image that survives.
        The pool is unusable afterwards (close() then closes without writing anything back)."""
        self._crashed = True
        return bytes(self._media_mv)

    _crashed = False

    def close(self) -> None:
        if self.media is None:
            return
        if not self._crashed:
            self.write_back_all()
        super().close()
        media, self.media = self.media, None  # type: ignore[assignment]
        media.close()


def with_model(media: Pmem, model: str = "eadr", seed: int = 0) -> Pmem:
    """The backend for a persistence model over a media backend: the media itself for eadr
    (every completed store is durable: the fast default path, unchanged), else a CachePmem."""
    if model == "eadr":
        return media
    if model not in PERSISTENCE_MODELS:
        raise ValueError(f"persistence model {model!r}: expected one of {PERSISTENCE_MODELS}")
    return CachePmem(media, model, seed)


class MappedPmem(Pmem):
    """mmap of a regular file, a block device or a devdax character device (/dev/daxN.M)."""

    def __init__(self, path: str, *, readonly: bool = False, create_size: int = 0,
                 mode: int = 0o644) -> None:
        self.path = path
        self.fd = -1
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create_size:
            flags |= os.O_CREAT | os.O_EXCL
        if create_size % 8:
            raise OSError(errno.EINVAL, f"pool size {create_size}: not a multiple of 8", path)
        # O_NONBLOCK: a FIFO or the like must be refused below, not waited on in open().
        self.fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, mode)
        self.created = bool(create_size)
        try:
            _lock(self.fd, path, shared=readonly)
            st = os.fstat(self.fd)
            self.is_devdax = stat.S_ISCHR(st.st_mode)
            self.is_device = self.is_devdax or stat.S_ISBLK(st.st_mode)
            if not (self.is_device or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, "not a pool file or a pmem device", path)
            if create_size and not self.is_device:
                os.posix_fallocate(self.fd, 0, create_size)
            size = pool_size(self.fd, path)
            if size == 0:
                raise OSError(errno.EINVAL, "pool is empty", path)
            if size % 8:  # a pool's size is whole blocks; the table is read as 8-byte words
                raise OSError(errno.EINVAL, f"pool size {size}: not a multiple of 8", path)
            prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
            buf = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(self.fd)
            if create_size:
                os.unlink(path)
            raise
        super().__init__(buf, readonly)
        self._map = buf
        self._release_whole: Callable[[], None] = _nothing
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
        raw = _libpmem_raw
        if lib is not None and raw is not None and (
                self.is_devdax or lib.pmem_is_pmem(self._base, self.size)):
            self.persist_mode = "libpmem"
            base, flush = self._base, lib.pmem_persist
            fast_flush, fast_copy = raw.pmem_persist, raw.pmem_memcpy_persist
            fast_copy_nodrain, fast_drain = raw.pmem_memcpy_nodrain, raw.pmem_drain
            byref = ctypes.byref
            # The whole pool as one ctypes array: byref(whole, off) is a pointer into the mapping
            # built at C level. close() drops it (release_whole), so a call after close raises
            # TypeError instead of touching an unmapped address.
            whole: ctypes.Array[ctypes.c_char] | None = \
                (ctypes.c_char * self.size).from_buffer(self._buf)
            mv = self._mv

            def persist(off: int, n: int) -> None:
                if n < _FAST_LEN:
                    fast_flush(byref(whole, off), n)  # type: ignore[arg-type]
                elif whole is None:
                    raise ValueError("pool is closed")
                else:
                    flush(base + off, n)

            def store_persist(off: int, data: bytes | bytearray | memoryview) -> None:
                if type(data) is bytes and len(data) < _FAST_LEN:
                    # bytes go to C as a pointer to their buffer: no copy, no conversion
                    fast_copy(byref(whole, off), data, len(data))  # type: ignore[arg-type]
                else:
                    mv[off : off + len(data)] = data
                    persist(off, len(data))

            def store_flush(off: int, data: bytes | bytearray | memoryview) -> None:
                n = len(data)
                if type(data) is bytes and n < _FAST_LEN:
                    # non-temporal stores, no wait for them: swap_persist's fence waits
                    fast_copy_nodrain(byref(whole, off), data, n)  # type: ignore[arg-type]
                else:
                    mv[off : off + n] = data
                    persist(off, n)

            if type(self).cas16 is Pmem.cas16:  # not overridden: fuse swap and persist
                q, stripes, pack_pair = self._q, self._stripes, _PAIR.pack_into
                mask = CAS_STRIPES - 1

                def swap_persist(word: int, old_lo: int, old_hi: int, new_lo: int,
                                 new_hi: int) -> bool:
                    stripe = stripes[word >> 1 & mask]
                    try:
                        stripe.pop()
                    except IndexError:
                        _take_stripe(stripe)
                    try:
                        if q[word] != old_lo or q[word + 1] != old_hi:
                            return False
                        off = word << 3
                        fast_drain()  # store_flush-ed blocks are durable before the swap
                        pack_pair(mv, off, new_lo, new_hi)  # one C call, as in cas16
                    finally:
                        stripe.append(None)
                    fast_flush(byref(whole, off + 8), 8)  # type: ignore[arg-type]
                    return True

                self.swap_persist = swap_persist  # type: ignore[method-assign]

            def release_whole() -> None:
                nonlocal whole
                whole = None

            self._release_whole = release_whole
            self.persist = persist  # type: ignore[method-assign]
            self.store_persist = store_persist  # type: ignore[method-assign]
            self.store_flush = store_flush  # type: ignore[method-assign]
            self.fence = raw.pmem_drain  # type: ignore[method-assign]
        elif self.is_devdax:
            self.persist_mode = "none (devdax without libpmem: relies on eADR)"
            self.persist = _no_persist  # type: ignore[method-assign]
        else:
            self.persist_mode = "msync"

    def persist(self, off: int, n: int) -> None:
        # msync fallback: mmap.flush needs a page-aligned offset.
        start = off & ~(mmap.PAGESIZE - 1)
        self._map.flush(start, off + n - start)

    def close(self) -> None:
        if self.fd < 0:
            return
        self._release_whole()
        super().close()
        self._map.close()
        os.close(self.fd)  # also drops the flock
        self.fd = -1


def _no_persist(off: int, n: int) -> None:
    pass


def _nothing() -> None:
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
