"""`btt8 bench`: recovery time, reader starvation, and 4 KiB I/O against libpmemblk."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from . import core
from .pmemblk import PmemBlk


def recovery(path: str, bsize: int, pool_mib: int, loops: int, out: TextIO, err: TextIO,
             prewrite: int = 0, threads: int = 1, seed: int = 1, span: int = 0) -> None:
    """Seed's recoveryperf: create when missing, then time `loops` close/open cycles.

    prewrite N fills a newly created pool with N random writes (LBAs from `seed`, split over
    `threads` writer threads), so the worst-case open of a well-used pool is reproducible by
    one command; span S draws those LBAs from 0..S-1 only (a workload's working set, as in the
    crash campaigns: what the crash-state explorer opens)."""
    if not os.path.exists(path):
        with core.create(path, bsize, pool_mib << 20) as pool:
            if prewrite:
                start = time.perf_counter()
                _prewrite(pool, prewrite, threads, seed, span)
                where = f" on LBAs 0..{span - 1}" if span else ""
                print(f"INFO: {prewrite} random writes{where} from {threads} thread(s), "
                      f"seed {seed}: {time.perf_counter() - start:.1f} s", file=err)
        print(f"INFO: created {path}", file=err)
    pool = core.open(path, bsize)
    times = []
    for _ in range(loops):
        pool.close()
        start = time.perf_counter()
        pool = core.open(path, bsize)
        times.append(time.perf_counter() - start)
    nblock = pool.nblock
    pool.close()
    print(f"nblocks: {nblock}", file=out)
    if times:
        times.sort()
        print(f"min: {times[0] * 1e3:.3f} ms", file=out)
        print(f"median: {times[len(times) // 2] * 1e3:.3f} ms", file=out)
        print(f"open: {sum(times) / len(times) * 1e3:.1f} ms", file=out)


def _prewrite(pool: core.Pool, nwrites: int, threads: int, seed: int, span: int = 0) -> None:
    """nwrites random writes, split over `threads` threads; thread i draws its LBAs (below
    span, if given) from Random(seed + i). With several threads the lanes each write lands on
    depend on scheduling, but the LBA sequence of every thread, and so the mapping's shape, is
    reproducible."""
    def run(i: int, n: int) -> None:
        rng = random.Random(seed + i)
        data = rng.randbytes(pool.bsize)
        write, nblock = pool.write, min(span or pool.nblock, pool.nblock)
        for lba in [rng.randrange(nblock) for _ in range(n)]:
            write(lba, data)
    shares = [nwrites // threads + (i < nwrites % threads) for i in range(threads)]
    workers = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(shares)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


class _Latency:
    def __init__(self) -> None:
        self.count = self.total = 0
        self.low, self.high = 1 << 63, 0

    def merge(self, count: int, total: int, low: int, high: int) -> None:
        self.count += count
        self.total += total
        self.low, self.high = min(self.low, low), max(self.high, high)

    def row(self, kind: str, nwriters: int) -> str:
        return f"{kind} {nwriters} {self.total // self.count} {self.low} {self.high}"


def _timed_loop(op: Callable[[], object], running: list[bool], stats: _Latency,
                lock: threading.Lock) -> None:
    clock = time.perf_counter_ns
    count = total = high = 0
    low = 1 << 63
    while running[0]:
        start = clock()
        op()
        lat = clock() - start
        total += lat
        count += 1
        low = min(low, lat)
        high = max(high, lat)
    with lock:
        stats.merge(count, total, low, high)


def starve(path: str, bsize: int, pool_mib: int, seconds: float, writers: list[int],
           out: TextIO, err: TextIO) -> None:
    """Seed's starve: one reader and N writers on LBA 0. Unlike the seed, stats are reset for
    every row, so each row describes its own writer count."""
    if os.path.exists(path):
        pool = core.open(path, bsize)
    else:
        pool = core.create(path, bsize, pool_mib << 20)
        print(f"INFO: created {path}", file=err)
    data = os.urandom(pool.bsize)
    print("rorw nwriters avglatns minlatns maxlatns", file=out)
    with pool:
        for nwriters in writers:
            running = [True]
            lock = threading.Lock()
            reads, writes = _Latency(), _Latency()
            threads = [threading.Thread(target=_timed_loop, args=(
                lambda: pool.write(0, data), running, writes, lock)) for _ in range(nwriters)]
            threads.append(threading.Thread(target=_timed_loop, args=(
                lambda: pool.read(0), running, reads, lock)))
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            running[0] = False
            for thread in threads:
                thread.join()
            if reads.count:
                print(reads.row("R", nwriters), file=out)
            if writes.count:
                print(writes.row("W", nwriters), file=out)
            out.flush()


def interpreter() -> dict[str, object]:
    """Which Python ran the benchmark: the numbers depend on it (Debian's python3 is built
    with profile-guided optimisation and LTO; a self-built one without them is slower)."""
    exe = os.path.realpath(sys.executable)
    # Debian's dpkg lists the files of each installed package: a two-line lookup, no process.
    pkg = f"python{sys.version_info.major}.{sys.version_info.minor}-minimal"
    try:
        with open(f"/var/lib/dpkg/info/{pkg}.list") as f:
            debian = exe in f.read().split()
    except OSError:
        debian = False
    return {"executable": sys.executable, "realpath": exe,
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "build": " ".join(platform.python_build()), "compiler": platform.python_compiler(),
            "debian_package": pkg if debian else None,
            "pgo": "yes (Debian's build)" if debian else "unknown"}


def io(bsize: int, pool_mib: int, ops: int, compare: str | None, directory: str,
       seed: int, read_buffer: str = "memoryview", interleave: int = 0,
       first: str = "btt8", fresh: bool = False) -> dict[str, dict[str, float]]:
    """Random writes then reads of the same LBAs with the same buffers, one library's passes
    after the other's (`first` says whose come first), in one process. Pools live in
    `directory` (tmpfs: /dev/shm); both are created before either is timed, and each is
    removed after its passes.

    Unless `fresh`, every LBA of a pool is written once before its timed passes (untimed): a
    pool in service, whose blocks have all been written. On a fresh tmpfs pool the first store
    to each page is a page fault (34,000 of them in 50,000 writes over 256 MiB, both libraries
    alike: two thirds of a write pass), and this host charges a varying price for one, which
    moved single runs' write ratio between 0.5 and 2.2 (BENCHMARKS.md); pmem itself (devdax)
    has no such fault per block. `fresh` keeps them in the timed passes. Each row counts the
    minor page faults of its timed passes.

    Each library gets its cheapest handle to the one read buffer, made once before the timed
    loop: libpmemblk the buffer's address (as before), BTT8's read_into a memoryview of it
    (read_buffer "bytearray" passes the bytearray itself: read_into then makes the view on
    every call, ~50 ns more per read here).

    With fresh pools the order counted: the library whose passes came first wrote a few per
    cent slower (BENCHMARKS.md), so `first` lets a series alternate it; each row says its
    `position`.

    interleave N (with compare): both pools open at once, and each pass alternates slices of N
    operations between the libraries (same LBAs, same order), so that a busy host's slow
    patches fall on both alike; each library's rate is its ops over the sum of its slices."""
    if interleave and compare == "libpmemblk":
        return _io_interleaved(bsize, pool_mib, ops, directory, seed, read_buffer, interleave,
                               fresh)
    # Both libraries persist with cache flushes, as they would on real pmem; libpmem reads this
    # when it loads, so it must be set before either library is first used.
    os.environ["PMEM_IS_PMEM_FORCE"] = "1"
    poolsize = pool_mib << 20
    results: dict[str, dict[str, float]] = {}
    wbuf = os.urandom(bsize)
    rbuf = bytearray(bsize)
    stem = os.path.join(directory, f"btt8-bench-{os.getpid()}")
    btt8_path, blk_path = stem + ".btt8", stem + ".pmemblk"

    def btt8_passes() -> None:
        start = time.perf_counter()
        pool = core.open(btt8_path, bsize)
        open_s = time.perf_counter() - start
        with pool:
            if not fresh:
                _fill(pool.write, nblock, wbuf)
            results["btt8"] = _run_io(pool.write, pool.read_into, lbas, wbuf, rbuf, open_s,
                                      read_buffer)
        _unlink(btt8_path)

    def pmemblk_passes() -> None:
        start = time.perf_counter()
        blk = PmemBlk.open(blk_path, bsize)
        open_s = time.perf_counter() - start
        if not fresh:
            _fill(lambda lba, data: blk.write_raw(blk.handle, data, lba), nblock, wbuf)
        results["libpmemblk"] = _run_pmemblk(blk, lbas, wbuf, rbuf, open_s)
        blk.close()
        _unlink(blk_path)

    try:
        with core.create(btt8_path, bsize, poolsize) as pool:
            nblock = pool.nblock
        passes = {"btt8": btt8_passes}
        if compare == "libpmemblk":
            blk = PmemBlk.create(blk_path, bsize, poolsize)
            nblock = min(nblock, blk.nblock)  # same LBAs must be valid in both pools
            blk.close()
            passes["libpmemblk"] = pmemblk_passes
        rng = random.Random(seed)
        lbas = [rng.randrange(nblock) for _ in range(ops)]
        order = sorted(passes, key=lambda name: name != first)  # `first`, then the other
        for position, name in enumerate(order, 1):
            passes[name]()
            results[name]["position"] = position
    finally:
        _unlink(btt8_path)
        _unlink(blk_path)
    return results


def _io_interleaved(bsize: int, pool_mib: int, ops: int, directory: str, seed: int,
                    read_buffer: str, slice_ops: int,
                    fresh: bool) -> dict[str, dict[str, float]]:
    os.environ["PMEM_IS_PMEM_FORCE"] = "1"
    poolsize = pool_mib << 20
    wbuf = os.urandom(bsize)
    rbuf, blk_rbuf = bytearray(bsize), bytearray(bsize)
    stem = os.path.join(directory, f"btt8-bench-{os.getpid()}")
    btt8_path, blk_path = stem + ".btt8", stem + ".pmemblk"
    try:
        core.create(btt8_path, bsize, poolsize).close()
        PmemBlk.create(blk_path, bsize, poolsize).close()
        start = time.perf_counter()
        pool = core.open(btt8_path, bsize)
        open_s = time.perf_counter() - start
        start = time.perf_counter()
        blk = PmemBlk.open(blk_path, bsize)
        blk_open_s = time.perf_counter() - start
        nblock = min(pool.nblock, blk.nblock)
        rng = random.Random(seed)
        lbas = [rng.randrange(nblock) for _ in range(ops)]
        slices = [lbas[i:i + slice_ops] for i in range(0, ops, slice_ops)]
        target = memoryview(rbuf) if read_buffer == "memoryview" else rbuf
        handle, blk_write, blk_read = blk.handle, blk.write_raw, blk.read_raw
        rptr = ctypes.addressof((ctypes.c_char * bsize).from_buffer(blk_rbuf))
        write, read = pool.write, pool.read_into
        if not fresh:
            _fill(write, nblock, wbuf)
            _fill(lambda lba, data: blk_write(handle, data, lba), nblock, wbuf)
        clock = time.perf_counter
        # btt8 write, pmemblk write, btt8 read, pmemblk read: seconds, then page faults
        times = [0.0, 0.0, 0.0, 0.0]
        faults = [0, 0, 0, 0]
        for part in slices:
            before = _minor_faults()
            start = clock()
            for lba in part:
                write(lba, wbuf)
            mid = clock()
            middle = _minor_faults()
            resume = clock()
            for lba in part:
                blk_write(handle, wbuf, lba)
            times[0] += mid - start
            times[1] += clock() - resume
            faults[0] += middle - before
            faults[1] += _minor_faults() - middle
        for part in slices:
            before = _minor_faults()
            start = clock()
            for lba in part:
                read(lba, target)
            mid = clock()
            middle = _minor_faults()
            resume = clock()
            for lba in part:
                blk_read(handle, rptr, lba)
            times[2] += mid - start
            times[3] += clock() - resume
            faults[2] += middle - before
            faults[3] += _minor_faults() - middle
        if isinstance(target, memoryview):
            target.release()
        results = {"btt8": _rates(lbas, times[0], times[2], wbuf, rbuf, open_s,
                                  faults[0], faults[2]),
                   "libpmemblk": _rates(lbas, times[1], times[3], wbuf, blk_rbuf, blk_open_s,
                                        faults[1], faults[3])}
        pool.close()
        blk.close()
        return results
    finally:
        _unlink(btt8_path)
        _unlink(blk_path)


def ops(bsize: int, pool_mib: int, calls: int, repeat: int, directory: str,
        seed: int) -> dict[str, dict[str, float]]:
    """Cost per call with no page faults and a warm working set, the least noisy measure on a
    shared host: `calls` random LBAs are written once in both pools (BTT8 and libpmemblk, one
    process), then `repeat` rounds each time a write pass and a read pass (read_into with a
    memoryview made once; libpmemblk the buffer's address) over them per library, alternating
    libraries within a round so a busy patch of the host hits both. Reports the fastest round
    of each (ns per call) and the ratios of those (libpmemblk / BTT8: above 1 is faster)."""
    os.environ["PMEM_IS_PMEM_FORCE"] = "1"
    poolsize = pool_mib << 20
    wbuf = os.urandom(bsize)
    rbuf = bytearray(bsize)  # one read buffer for both: its alignment changes a copy's speed
    stem = os.path.join(directory, f"btt8-bench-{os.getpid()}")
    btt8_path, blk_path = stem + ".btt8", stem + ".pmemblk"
    try:
        pool = core.create(btt8_path, bsize, poolsize)
        blk = PmemBlk.create(blk_path, bsize, poolsize)
        rng = random.Random(seed)
        lbas = [rng.randrange(min(pool.nblock, blk.nblock)) for _ in range(calls)]
        target = memoryview(rbuf)
        handle, blk_write, blk_read = blk.handle, blk.write_raw, blk.read_raw
        rptr = ctypes.addressof((ctypes.c_char * bsize).from_buffer(rbuf))
        write, read = pool.write, pool.read_into
        for lba in lbas:  # fault every block in
            write(lba, wbuf)
            blk_write(handle, wbuf, lba)
        clock = time.perf_counter_ns
        best = [1 << 62] * 4  # btt8 write, libpmemblk write, btt8 read, libpmemblk read
        for _ in range(repeat):
            start = clock()
            for lba in lbas:
                write(lba, wbuf)
            mid = clock()
            for lba in lbas:
                blk_write(handle, wbuf, lba)
            end = clock()
            best[0], best[1] = min(best[0], mid - start), min(best[1], end - mid)
            start = clock()
            for lba in lbas:
                read(lba, target)
            mid = clock()
            for lba in lbas:
                blk_read(handle, rptr, lba)
            end = clock()
            best[2], best[3] = min(best[2], mid - start), min(best[3], end - mid)
        target.release()
        if rbuf != wbuf:
            raise RuntimeError("benchmark read back different data")
        pool.close()
        blk.close()
        per_call = [round(t / calls) for t in best]
        return {"btt8": {"write_ns": per_call[0], "read_ns": per_call[2]},
                "libpmemblk": {"write_ns": per_call[1], "read_ns": per_call[3]},
                "ratio": {"write": round(best[1] / best[0], 3),
                          "read": round(best[3] / best[2], 3)}}
    finally:
        _unlink(btt8_path)
        _unlink(blk_path)


def _run_io(write: Callable, read: Callable, lbas: list[int], wbuf: bytes, rbuf: bytearray,
            open_s: float, read_buffer: str = "memoryview") -> dict[str, float]:
    """Time a write pass then a read pass over lbas, calling write(lba, wbuf), read(lba, rbuf)
    (or read(lba, memoryview(rbuf)), the view made once)."""
    rbuf[:] = bytes(len(rbuf))
    target = memoryview(rbuf) if read_buffer == "memoryview" else rbuf
    clock = time.perf_counter
    faults = _minor_faults()
    start = clock()
    for lba in lbas:
        write(lba, wbuf)
    wtime = clock() - start
    wfaults = _minor_faults() - faults
    start = clock()
    for lba in lbas:
        read(lba, target)
    rtime = clock() - start
    rfaults = _minor_faults() - faults - wfaults
    if isinstance(target, memoryview):
        target.release()
    return _rates(lbas, wtime, rtime, wbuf, rbuf, open_s, wfaults, rfaults)


def _run_pmemblk(blk: PmemBlk, lbas: list[int], wbuf: bytes, rbuf: bytearray,
                 open_s: float) -> dict[str, float]:
    """The same passes calling libpmemblk through ctypes directly (no Python wrapper frame)."""
    rbuf[:] = bytes(len(rbuf))
    handle, write, read = blk.handle, blk.write_raw, blk.read_raw
    rptr = ctypes.addressof((ctypes.c_char * len(rbuf)).from_buffer(rbuf))
    clock = time.perf_counter
    faults = _minor_faults()
    start = clock()
    for lba in lbas:
        write(handle, wbuf, lba)
    wtime = clock() - start
    wfaults = _minor_faults() - faults
    start = clock()
    for lba in lbas:
        read(handle, rptr, lba)
    rtime = clock() - start
    rfaults = _minor_faults() - faults - wfaults
    return _rates(lbas, wtime, rtime, wbuf, rbuf, open_s, wfaults, rfaults)


def _fill(write: Callable[[int, bytes], object], nblock: int, data: bytes) -> None:
    """Write every LBA once (untimed): a pool in service, every block written before."""
    for lba in range(nblock):
        write(lba, data)


def _minor_faults() -> int:
    """This process's minor page faults so far (read outside the timed loops)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rates(lbas: list[int], wtime: float, rtime: float, wbuf: bytes, rbuf: bytearray,
           open_s: float, write_faults: int, read_faults: int) -> dict[str, float]:
    if rbuf != wbuf:
        raise RuntimeError("benchmark read back different data")
    return {"write_ops_per_s": round(len(lbas) / wtime),
            "read_ops_per_s": round(len(lbas) / rtime), "open_s": round(open_s, 6),
            "write_faults": write_faults, "read_faults": read_faults}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
