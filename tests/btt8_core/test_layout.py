import errno

import btt8
import pytest
from btt8.core import ENTRY_SIZE, NFREE, Layout
from hypothesis import given
from hypothesis import strategies as st

MIB = 1 << 20


def seed_sizing(bsize: int, pool: int) -> tuple[int, int, int]:
    b = pool // bsize
    k = b - 1
    d = k * bsize // (bsize + 16)
    return d - NFREE, bsize, (k - d + 1) * bsize


def test_min_pool_min_bsize_matches_seed_formula() -> None:
    lay = Layout.for_pool(512, 16 * MIB)
    assert (lay.nblocks, lay.ttoff, lay.dataoff) == seed_sizing(512, 16 * MIB)
    assert lay.nblocks == 27678
    assert lay.nfree == 4096


@pytest.mark.parametrize(("bsize", "pool"), [
    (511, 16 * MIB),          # below min bsize
    (520, 16 * MIB),          # entries would not be 16-byte aligned
    (512, 16 * MIB - 1),      # below min pool
    (4096, 16 * MIB),         # 4079 data blocks: not more than nfree
    (1 << 20, 64 * MIB),      # huge blocks: too few data blocks
])
def test_bad_sizes_are_einval(bsize: int, pool: int) -> None:
    with pytest.raises(btt8.Btt8Error) as info:
        Layout.for_pool(bsize, pool)
    assert info.value.errno == errno.EINVAL


def test_4k_blocks_need_just_over_16_mib() -> None:
    lay = Layout.for_pool(4096, 17 * MIB)
    assert lay.nblocks == seed_sizing(4096, 17 * MIB)[0] > 0


@given(bsize=st.integers(32, 1024).map(lambda n: n * 16),
       pool=st.integers(16 * MIB, 256 * MIB))
def test_layout_fits_the_pool(bsize: int, pool: int) -> None:
    try:
        lay = Layout.for_pool(bsize, pool)
    except btt8.Btt8Error:
        return
    assert lay.ttoff + lay.nblocks * ENTRY_SIZE <= lay.dataoff
    assert lay.dataoff + lay.tblocks * bsize <= pool
    assert lay.dataoff % bsize == 0


def test_failed_create_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "pool"
    with pytest.raises(btt8.Btt8Error) as info:
        btt8.create(path, 4096, 16 * MIB)
    assert info.value.errno == errno.EINVAL
    assert not path.exists()
