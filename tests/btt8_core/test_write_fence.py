"""WwriteBlock's copy may be left undrained (store_flush) until the fence that opens
swap_persist: the block must still be durable before the mapping to it can be."""

import subprocess
import sys
from pathlib import Path

import btt8
from btt8.pmem import MemoryPmem
from btt8_helpers import MIB


class Recording(MemoryPmem):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls: list[str] = []

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.calls.append("store_persist")
        super().store_persist(off, data)

    def fence(self) -> None:
        self.calls.append("fence")

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        self.calls.append("cas16")
        return super().cas16(word, old_lo, old_hi, new_lo, new_hi)

    def persist(self, off: int, n: int) -> None:
        self.calls.append("persist")


def test_base_backend_sees_store_fence_swap_persist_in_order() -> None:
    """A backend that overrides the parts (tracing, write-back models) sees each of them, the
    fence between the block and the swap."""
    pmem = Recording(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    pmem.calls.clear()
    pool.write(3, b"q" * 512)
    assert pmem.calls == ["store_persist", "persist", "fence", "cas16", "persist"]
    assert pool.read(3) == b"q" * 512


NODRAIN_SCRIPT = """
import os, sys
os.environ["PMEM_IS_PMEM_FORCE"] = "1"
import btt8
from btt8.pmem import MappedPmem, libpmem
if libpmem() is None:
    print("no libpmem"); sys.exit(0)
path = sys.argv[1]
pmem = MappedPmem(path + ".raw", create_size=1 << 20)
pmem.store_flush(4096, b"x" * 512)                   # bytes: the undrained C copy
pmem.store_flush(8192, bytearray(b"y" * 512))        # other buffers: store, then persist
assert pmem.swap_persist(20, 0, 0, 7, 9) and not pmem.swap_persist(20, 0, 0, 1, 1)
pmem.close()
with open(path + ".raw", "rb") as f:
    data = f.read()
assert data[4096:4608] == b"x" * 512 and data[8192:8704] == b"y" * 512
with btt8.create(path, 4096, 32 << 20) as pool:
    for lba in range(200):
        pool.write(lba, bytes([lba]) * 4096)
with btt8.open(path) as pool:
    assert all(pool.read(lba) == bytes([lba]) * 4096 for lba in range(200))
print("ok")
"""


def test_libpmem_store_flush_then_swap_persist(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", NODRAIN_SCRIPT, str(tmp_path / "pool")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("ok", "no libpmem")
