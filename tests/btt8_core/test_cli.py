"""`python -m btt8` end to end: exit codes, outputs, and no traceback on a corrupt pool."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from btt8_helpers import sha


def btt8(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "btt8", *args], capture_output=True,
                          input=stdin, timeout=120)


def test_create_info_write_read_check(tmp_path: Path) -> None:
    pool = str(tmp_path / "pool")
    made = btt8("create", pool, "--bsize", "512", "--pool-mib", "16")
    assert made.returncode == 0, made.stderr
    assert b"27678 blocks" in made.stdout
    info = btt8("info", pool, "--json")
    assert info.returncode == 0
    fields = json.loads(info.stdout)
    assert (fields["bsize"], fields["nblocks"], fields["free_blocks"]) == (512, 27678, 4096)
    assert fields["zeroed_entries"] == 27678
    block = os.urandom(512)
    (tmp_path / "in").write_bytes(block)
    assert btt8("write", pool, "9", "--in", str(tmp_path / "in")).returncode == 0
    assert btt8("read", pool, "9", "--out", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == block
    assert btt8("read", pool, "10", "--out", "-").stdout == bytes(512)
    fields = json.loads(btt8("info", pool, "--json").stdout)
    assert (fields["zeroed_entries"], fields["lanes_used"], fields["max_lane_count"]) == \
        (27677, 1, 1)
    checked = btt8("check", pool)
    assert checked.returncode == 0
    assert b"ok" in checked.stdout


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    pool = str(tmp_path / "pool")
    missing = btt8("info", pool)
    assert missing.returncode == 2
    assert b"No such file" in missing.stderr and b"Traceback" not in missing.stderr
    assert btt8("create", pool, "--bsize", "500", "--pool-mib", "16").returncode == 2
    assert btt8("create", pool, "--bsize", "512", "--pool-mib", "16").returncode == 0
    exists = btt8("create", pool, "--bsize", "512", "--pool-mib", "16")
    assert exists.returncode == 2 and b"exists" in exists.stderr
    (tmp_path / "short").write_bytes(b"x")
    short = btt8("write", pool, "0", "--in", str(tmp_path / "short"))
    assert short.returncode == 2 and b"block size is 512" in short.stderr
    out_of_range = btt8("read", pool, "27678", "--out", "-")
    assert out_of_range.returncode == 2 and b"out of range" in out_of_range.stderr


def test_check_reports_corruption_without_traceback_or_writes(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    assert btt8("create", str(pool), "--bsize", "512", "--pool-mib", "16").returncode == 0
    with pool.open("r+b") as f:  # LBA 4 now shares LBA 5's PBA
        f.seek(512 + 4 * 16 + 8)
        f.write(struct.pack("<Q", 4096 + 5))
    before = sha(pool)
    for command in ("check", "info"):
        result = btt8(command, str(pool))
        assert result.returncode == 1
        assert b"Traceback" not in result.stderr
        assert re.search(rb"corrupt: .*PBA 4101 is mapped by both LBA 4 and LBA 5", result.stderr)
    assert sha(pool) == before


def test_files_that_are_no_pool_get_one_error_line(tmp_path: Path) -> None:
    """A length not a multiple of 8, a FIFO (which used to hang `info`): exit 2, one line."""
    odd = tmp_path / "odd"
    odd.write_bytes(bytes((16 << 20) + 3))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, why in ((odd, b"not a multiple of 8"), (fifo, b"not a pool file")):
        for command in ("info", "check"):
            r = btt8(command, str(path))
            assert r.returncode == 2 and why in r.stderr, r.stderr
            assert b"Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_create_of_an_odd_size_leaves_nothing(tmp_path: Path) -> None:
    import btt8 as lib

    path = tmp_path / "pool"
    try:
        lib.create(str(path), 512, (16 << 20) + 3)
    except lib.Btt8Error as e:
        assert "multiple of 8" in str(e)
    else:
        raise AssertionError("created a pool of an odd size")
    assert not path.exists()


def test_read_opens_the_pool_read_only(tmp_path: Path) -> None:
    pool = str(tmp_path / "pool")
    assert btt8("create", pool, "--bsize", "512", "--pool-mib", "16").returncode == 0
    with open(pool, "rb") as f:  # a shared lock: a read-write open would be refused EBUSY
        import fcntl

        fcntl.flock(f, fcntl.LOCK_SH)
        r = btt8("read", pool, "3", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == bytes(512)
