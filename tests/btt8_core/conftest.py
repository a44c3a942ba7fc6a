"""Pool fixtures shared by the btt8 tests."""

import btt8
import pytest
from btt8.pmem import MemoryPmem
from btt8_helpers import MIB, DurablePmem


@pytest.fixture
def mem_pool() -> btt8.Pool:
    """16 MiB in-memory pool with 512-byte blocks (27678 LBAs)."""
    return btt8.create_on(MemoryPmem(16 * MIB), 512)


@pytest.fixture
def durable_pool() -> btt8.Pool:
    return btt8.create_on(DurablePmem(16 * MIB), 512)
