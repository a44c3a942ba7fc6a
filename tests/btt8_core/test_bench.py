"""Benchmark smoke tests: output shape only, never timing."""

import json
import re
import subprocess
import sys
from pathlib import Path


def btt8(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "btt8", "bench", *args], capture_output=True,
                          text=True, timeout=120)


def test_bench_io_prints_one_json_object(tmp_path: Path) -> None:
    result = btt8("io", "--bsize", "4096", "--pool-mib", "32", "--ops", "300", "--compare",
                  "libpmemblk", "--json", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for name in ("btt8", "libpmemblk"):
        assert set(report[name]) == {"write_ops_per_s", "read_ops_per_s", "open_s", "position",
                                     "write_faults", "read_faults"}
        assert report[name]["write_ops_per_s"] > 0 and report[name]["read_ops_per_s"] > 0
    assert set(report["ratio"]) == {"write", "read"}
    assert list(tmp_path.iterdir()) == []  # temporary pools removed


def test_bench_recovery_creates_then_times_opens(tmp_path: Path) -> None:
    pool = str(tmp_path / "pool")
    result = btt8("recovery", pool, "--bsize", "4096", "--pool-mib", "17", "--loops", "3")
    assert result.returncode == 0, result.stderr
    assert "created" in result.stderr
    assert re.fullmatch(r"open: \d+\.\d ms", result.stdout.strip().splitlines()[-1])
    again = btt8("recovery", pool, "--bsize", "4096", "--loops", "2")
    assert "created" not in again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith("open: ")


def test_bench_starve_rows(tmp_path: Path) -> None:
    result = btt8("starve", str(tmp_path / "pool"), "--bsize", "512", "--pool-mib", "16",
                  "--seconds", "0.2", "--writers", "1", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "rorw nwriters avglatns minlatns maxlatns"
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [("R", "1"), ("W", "1"), ("R", "2"), ("W", "2")]
    for row in rows:
        avg, low, high = map(int, row[2:])
        assert low <= avg <= high


def test_bench_recovery_prewrite_fills_a_new_pool(tmp_path: Path) -> None:
    import btt8 as lib

    pool = str(tmp_path / "pool")
    result = btt8("recovery", pool, "--bsize", "4096", "--pool-mib", "17", "--loops", "1",
                  "--prewrite", "300", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "300 random writes" in result.stderr
    summary = lib.check(pool)
    assert (summary["lanes_used"], summary["max_lane_count"]) == (1, 300)


def test_bench_io_reports_the_interpreter(tmp_path: Path) -> None:
    result = btt8("io", "--bsize", "4096", "--pool-mib", "32", "--ops", "100", "--json",
                  "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)["interpreter"]
    assert info["executable"] == sys.executable
    assert info["version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["pgo"] in ("unknown", "yes (Debian's build)")


def test_bench_recovery_span_keeps_prewrites_in_a_working_set(tmp_path: Path) -> None:
    import btt8 as lib

    pool = str(tmp_path / "pool")
    result = btt8("recovery", pool, "--bsize", "512", "--pool-mib", "16", "--loops", "2",
                  "--prewrite", "200", "--span", "8")
    assert result.returncode == 0, result.stderr
    assert "200 random writes on LBAs 0..7" in result.stderr
    assert re.fullmatch(r"median: \d+\.\d{3} ms", result.stdout.splitlines()[-2])
    with lib.open(pool, readonly=True) as opened:
        written = [lba for lba in range(opened.nblock) if opened.read(lba) != bytes(512)]
    assert written and max(written) < 8


def test_bench_io_read_buffer_choices(tmp_path: Path) -> None:
    for choice in ("memoryview", "bytearray"):
        result = btt8("io", "--bsize", "512", "--pool-mib", "16", "--ops", "50", "--json",
                      "--read-buffer", choice, "--dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["btt8"]["read_ops_per_s"] > 0


def test_bench_io_interleaved_reports_both_libraries(tmp_path: Path) -> None:
    result = btt8("io", "--bsize", "4096", "--pool-mib", "32", "--ops", "300", "--compare",
                  "libpmemblk", "--interleave", "64", "--json", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for name in ("btt8", "libpmemblk"):
        assert set(report[name]) == {"write_ops_per_s", "read_ops_per_s", "open_s",
                                     "write_faults", "read_faults"}
    assert set(report["ratio"]) == {"write", "read"}
    assert list(tmp_path.iterdir()) == []


def test_bench_io_times_filled_pools_unless_fresh(tmp_path: Path) -> None:
    """By default every LBA is written once before the timed passes, so they touch no new page;
    --fresh times the first touches: about one page fault per write to a new LBA."""
    for extra in ((), ("--interleave", "50")):
        counts = {}
        for fresh in (False, True):
            result = btt8("io", "--bsize", "4096", "--pool-mib", "32", "--ops", "300",
                          "--compare", "libpmemblk", "--json", "--dir", str(tmp_path), *extra,
                          *(("--fresh",) if fresh else ()))
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            counts[fresh] = [report[name]["write_faults"] for name in ("btt8", "libpmemblk")]
        assert max(counts[False]) <= 5, counts
        assert min(counts[True]) >= 250, counts


def test_bench_io_first_says_whose_passes_ran_first(tmp_path: Path) -> None:
    for first, positions in (("libpmemblk", (2, 1)), ("btt8", (1, 2))):
        result = btt8("io", "--bsize", "4096", "--pool-mib", "32", "--ops", "200", "--compare",
                      "libpmemblk", "--first", first, "--json", "--dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["btt8"]["position"], report["libpmemblk"]["position"]) == positions
        assert report["btt8"]["read_ops_per_s"] > 0 < report["libpmemblk"]["write_ops_per_s"]
        assert list(tmp_path.iterdir()) == []


def test_bench_ops_prints_per_call_costs(tmp_path: Path) -> None:
    result = btt8("ops", "--pool-mib", "32", "--calls", "50", "--repeat", "3", "--dir",
                  str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for name in ("btt8", "libpmemblk"):
        assert set(report[name]) == {"write_ns", "read_ns"}
        assert report[name]["write_ns"] > 0 and report[name]["read_ns"] > 0
    assert set(report["ratio"]) == {"write", "read"}
    assert report["interpreter"]["version"]
    assert list(tmp_path.iterdir()) == []  # temporary pools removed
