"""Threads hammering a few LBAs with self-checking payloads: no torn read, ever."""

import struct
import sys
import threading
import time
import zlib

import btt8
import pytest
from btt8.core import Pool

HEADER = struct.Struct("<QQQ")  # lba, writer id, sequence number
BSIZE = 512


def make_payload(lba: int, writer: int, seq: int) -> bytes:
    head = HEADER.pack(lba, writer, seq)
    body = (head * (BSIZE // len(head) + 1))[: BSIZE - len(head) - 4]
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def check_payload(lba: int, block: bytes) -> tuple[int, int] | None:
    """(writer, seq) of an intact payload for this LBA; None for the initial zero block."""
    if block == bytes(BSIZE):
        return None
    got_lba, writer, seq = HEADER.unpack_from(block)
    assert zlib.crc32(block[:-4]) == struct.unpack("<I", block[-4:])[0], "torn block"
    assert block == make_payload(lba, writer, seq), "mixed block"
    assert got_lba == lba, "block from another LBA"
    return writer, seq


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, mid-step included
    yield
    sys.setswitchinterval(old)


def test_eight_threads_never_see_a_torn_or_stale_block(mem_pool: Pool, fast_switching) -> None:
    lbas = [0, 1, 2, mem_pool.nblock - 1]
    errors: list[BaseException] = []
    stop = time.monotonic() + 2.0
    reads = [0]

    def worker(writer: int) -> None:
        try:
            buf = bytearray(BSIZE)
            seq = 0
            last_seen: dict[tuple[int, int], int] = {}
            while time.monotonic() < stop:
                for lba in lbas:
                    seq += 1
                    mem_pool.write(lba, make_payload(lba, writer, seq))
                    mine = check_payload(lba, mem_pool.read(lba))
                    assert mine is not None
                    mem_pool.read_into(lba, buf)
                    seen = check_payload(lba, bytes(buf))
                    assert seen is not None
                    # per (LBA, writer), sequence numbers seen by one reader never go back
                    key = (lba, seen[0])
                    assert last_seen.get(key, 0) <= seen[1], "value reverted"
                    last_seen[key] = seen[1]
                    reads[0] += 2
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert reads[0] > 1000
    # The free list is still a consistent complement of the map after the storm.
    recovered = Pool(mem_pool._pmem)
    for lba in lbas:
        check_payload(lba, recovered.read(lba))
    assert len(set(recovered.lane_state()[0])) == btt8.NFREE
