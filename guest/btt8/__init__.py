"""BTT8: an alternative Block Translation Table for persistent memory (stdlib + ctypes).

    import btt8
    with btt8.create("/dev/shm/pool", 4096, 64 << 20) as pool:
        pool.write(0, bytes(4096))
    with btt8.open("/dev/shm/pool", 4096) as pool:
        data = pool.read(0)
    summary = btt8.check("/dev/shm/pool")  # read-only; raises CorruptionError if inconsistent
"""

from .core import (
    FLAG_ZERO,
    MIN_BSIZE,
    MIN_POOL,
    NFREE,
    Btt8Error,
    CorruptionError,
    Layout,
    Pool,
    check,
    create,
    create_on,
    open,
)
from .pmem import (
    PERSISTENCE_MODELS,
    CachePmem,
    MappedPmem,
    MemoryPmem,
    Pmem,
    PoolBusyError,
    with_model,
)

__all__ = [
    "FLAG_ZERO", "MIN_BSIZE", "MIN_POOL", "NFREE", "Btt8Error", "CorruptionError", "Layout",
    "MappedPmem", "MemoryPmem", "Pmem", "Pool", "PoolBusyError", "check", "create", "create_on",
    "open", "CachePmem", "PERSISTENCE_MODELS", "with_model",
]
