"""Helpers shared by the VM tests (imported by name: tests/vm is on sys.path)."""

from __future__ import annotations

from pathlib import Path

from testbed.image import Image
from testbed.nvdimm import NvdimmSpec
from testbed.vm import VM, SerialPort

MiB = 1 << 20

# Fixed guest-side helpers, fed values only through argv (never a shell string).
PATTERN_PY = r"""
import mmap, os, sys
op, dev, off, pattern = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
if dev.startswith("/dev/dax"):
    fd = os.open(dev, os.O_RDWR)
    m = mmap.mmap(fd, 2 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if op == "write":
        m[off:off + len(pattern)] = pattern  # no msync: device-dax rejects it (EINVAL)
    else:
        sys.stdout.write(m[off:off + len(pattern)].decode(errors="replace"))
    m.close()
else:
    fd = os.open(dev, os.O_RDWR | os.O_SYNC)
    block = 4096
    if op == "write":
        os.pwrite(fd, pattern.ljust(block, b"\0"), off)
        os.fsync(fd)
    else:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        sys.stdout.write(os.pread(fd, len(pattern), off).decode(errors="replace"))
os.close(fd)
"""


def pattern_argv(op: str, dev: str, off: int, pattern: str) -> list[str]:
    return ["python3", "-c", PATTERN_PY, op, dev, str(off), pattern]


def our_qemus(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and marker.encode() in cmd:
                pids.append(int(proc.name))
    return pids


def make_vm(img: Image, base: Path, name: str, *, nvdimm_mib: int = 0,
            ports: tuple[str, ...] = (), append: str | None = None) -> VM:
    kw = {"append": append} if append else {}
    return VM.from_image(
        img, name, base / name / "state",
        nvdimms=[NvdimmSpec(base / name / "nvdimm0.img", nvdimm_mib * MiB)] if nvdimm_mib else [],
        serial_ports=[SerialPort(p, base / name / f"{p}.port") for p in ports],
        **kw,
    )
