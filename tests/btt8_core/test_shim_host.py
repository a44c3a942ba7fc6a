"""The driver shim's host-testable parts: the NBD export's verbs on a real BTT8 pool file, and
btt8ctl's format and attach refusals (which happen before nbdkit or the kernel are involved).
nbdkit, the kernel NBD client and /dev/btt8a run in tests/vm/test_shim.py."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import btt8
import pytest
from btt8.nbdexport import Export

BS = 4096


@pytest.fixture
def export(tmp_path: Path) -> Export:
    ex = Export(btt8.create(str(tmp_path / "pool"), BS, 32 << 20))
    yield ex
    ex.close()


def test_write_read_across_blocks(export: Export) -> None:
    data = os.urandom(3 * BS)
    export.pwrite(data, 5 * BS)
    buf = bytearray(4 * BS)
    export.pread(buf, 4 * BS)
    assert buf == bytes(BS) + data
    assert export.pool.read(6) == data[BS:2 * BS]  # one BTT8 block per NBD block


def test_zero_and_trim_whole_and_partial_blocks(export: Export) -> None:
    export.pwrite(b"\x11" * (4 * BS), 0)
    export.zero(BS + 100, 0)  # block 0 whole, block 1 partially
    got = bytearray(4 * BS)
    export.pread(got, 0)
    assert got[:BS + 100] == bytes(BS + 100)
    assert got[BS + 100:] == b"\x11" * (3 * BS - 100)
    export.trim(BS + 10, 2 * BS)  # block 2 whole; block 3 partial: a hint, left alone
    export.pread(got, 0)
    assert got[2 * BS:3 * BS] == bytes(BS)
    assert got[3 * BS:] == b"\x11" * BS
    export.flush()


@pytest.mark.parametrize("count,offset", [(BS, 100), (100, 0), (BS, -BS)])
def test_unaligned_io_is_refused_with_einval(export: Export, count: int, offset: int) -> None:
    with pytest.raises(OSError) as e:
        export.pwrite(bytes(count), offset)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        export.pread(bytearray(count), offset)


def test_io_past_the_end_is_refused(export: Export) -> None:
    with pytest.raises(OSError) as e:
        export.pread(bytearray(BS), export.size)
    assert e.value.errno == errno.EINVAL
    assert export.size == export.pool.nblock * BS


def ctl(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BTT8CTL_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "btt8.ctl", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_format_pool_file_refuses_to_overwrite(tmp_path: Path) -> None:
    pool = str(tmp_path / "pool")
    assert ctl("format", pool, "--bsize", "4096", state=tmp_path).returncode == 2  # no size
    made = ctl("format", pool, "--bsize", "4096", "--pool-mib", "32", state=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "bsize 4096" in made.stdout
    again = ctl("format", pool, "--bsize", "4096", "--pool-mib", "32", state=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert ctl("format", pool, "--bsize", "4096", "--pool-mib", "32", "--force",
               state=tmp_path).returncode == 0
    assert ctl("format", pool, "--bsize", "4000", "--force",
               state=tmp_path).returncode == 2  # not a kernel NBD block size


@pytest.mark.parametrize("damage", ["unformatted", "corrupt"])
def test_attach_of_a_bad_pool_fails_cleanly_and_writes_nothing(tmp_path: Path,
                                                               damage: str) -> None:
    pool = tmp_path / "pool"
    if damage == "unformatted":
        pool.write_bytes(os.urandom(1 << 20) * 32)
    else:
        btt8.create(str(pool), BS, 32 << 20).close()
        with open(pool, "r+b") as f:  # map LBA 0 onto LBA 1's block: a PBA used twice
            f.seek(BS + 8)
            first = f.read(8)
            f.seek(BS + 16 + 8)
            f.write(first)
    before = hashlib.sha256(pool.read_bytes()).hexdigest()
    r = ctl("attach", str(pool), state=tmp_path / "state")
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("btt8ctl: cannot attach")
    assert "nothing was written" in r.stderr and "Traceback" not in r.stderr
    assert hashlib.sha256(pool.read_bytes()).hexdigest() == before
    assert ctl("list", "--json", state=tmp_path / "state").stdout.strip() == "[]"


def test_detach_of_an_unknown_name_is_an_error(tmp_path: Path) -> None:
    r = ctl("detach", "btt8z", state=tmp_path)
    assert r.returncode == 2 and "not attached" in r.stderr
