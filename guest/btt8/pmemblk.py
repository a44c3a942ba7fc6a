"""PMDK's libpmemblk (libpmemblk.so.1) through ctypes, the yardstick for `btt8 bench io`."""

from __future__ import annotations

import ctypes
import os


class PmemBlkError(OSError):
    pass


class PmemBlk:
    """A libpmemblk pool. Callers should set PMEM_IS_PMEM_FORCE=1 before the first load when the
    pool lives on /dev/shm, or libpmem will msync on every write."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def lib(cls) -> ctypes.CDLL:
        if cls._lib is None:
            lib = ctypes.CDLL("libpmemblk.so.1", use_errno=True)
            vp, sz = ctypes.c_void_p, ctypes.c_size_t
            lib.pmemblk_create.argtypes = [ctypes.c_char_p, sz, sz, ctypes.c_uint]
            lib.pmemblk_create.restype = vp
            lib.pmemblk_open.argtypes = [ctypes.c_char_p, sz]
            lib.pmemblk_open.restype = vp
            lib.pmemblk_close.argtypes = [vp]
            lib.pmemblk_close.restype = None
            lib.pmemblk_nblock.argtypes = [vp]
            lib.pmemblk_nblock.restype = sz
            lib.pmemblk_read.argtypes = [vp, vp, ctypes.c_longlong]
            lib.pmemblk_write.argtypes = [vp, vp, ctypes.c_longlong]
            cls._lib = lib
        return cls._lib

    def __init__(self, handle: int | None, path: str) -> None:
        if not handle:
            err = ctypes.get_errno()
            raise PmemBlkError(err, os.strerror(err), path)
        lib = self.lib()
        self.handle = handle
        self.nblock = lib.pmemblk_nblock(handle)
        self.read_raw = lib.pmemblk_read  # (handle, buffer pointer, lba)
        self.write_raw = lib.pmemblk_write

    @classmethod
    def create(cls, path: str, bsize: int, poolsize: int, mode: int = 0o644) -> PmemBlk:
        return cls(cls.lib().pmemblk_create(os.fsencode(path), bsize, poolsize, mode), path)

    @classmethod
    def open(cls, path: str, bsize: int) -> PmemBlk:
        return cls(cls.lib().pmemblk_open(os.fsencode(path), bsize), path)

    def close(self) -> None:
        self.lib().pmemblk_close(self.handle)
