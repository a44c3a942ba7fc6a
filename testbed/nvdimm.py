"""Emulated NVDIMMs on the host: backing files, sizing rules, crash images.

QEMU carves the label area from the end of the memory backend, so a backing file holds
`size + label_size` bytes and the guest sees a region of `size` bytes. Linux aligns pmem regions
to 16 MiB: a region that is not a multiple of it cannot be split into namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
REGION_ALIGN = 16 * MiB
MIN_LABEL_SIZE = 128 * 1024


class NvdimmError(ValueError):
    """An NVDIMM size, label size or mode that cannot work."""


def parse_size(text: str) -> int:
    """'256M', '1G', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise NvdimmError(f"not a size: {text!r}")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@dataclass(frozen=True)
class NvdimmSpec:
    """One NVDIMM: its backing file and the region size the guest sees."""

    backing: Path
    size: int
    label_size: int = MIN_LABEL_SIZE

    def __post_init__(self) -> None:
        validate(self.size, self.label_size)

    @property
    def backing_size(self) -> int:
        return self.size + self.label_size


def validate(size: int, label_size: int = MIN_LABEL_SIZE) -> None:
    if size <= 0 or size % REGION_ALIGN:
        raise NvdimmError(
            f"NVDIMM region size {size} must be a positive multiple of 16 MiB "
            f"(try {round_region(size) // MiB}M)"
        )
    if label_size < MIN_LABEL_SIZE or label_size % 4096:
        raise NvdimmError(f"label size {label_size} must be >= 128 KiB and 4 KiB aligned")


def round_region(size: int) -> int:
    """The smallest valid region size >= size."""
    return max(REGION_ALIGN, -(-size // REGION_ALIGN) * REGION_ALIGN)


def create_backing(spec: NvdimmSpec) -> Path:
    """Create the sparse backing file if missing (existing content is kept: it is the media)."""
    spec.backing.parent.mkdir(parents=True, exist_ok=True)
    if spec.backing.exists():
        actual = spec.backing.stat().st_size
        if actual != spec.backing_size:
            raise NvdimmError(
                f"{spec.backing} is {actual} bytes, expected {spec.backing_size} "
                f"(region {spec.size} + labels {spec.label_size})"
            )
        return spec.backing
    with open(spec.backing, "xb") as f:
        f.truncate(spec.backing_size)
    return spec.backing


def copy_crash_image(src: Path, dst: Path) -> Path:
    """Copy a backing file, sparsely. Consistent only while no guest writes it: stop the VM first
    (vm.qmp('stop')) or copy after it exited."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # no data after pos: the rest is a hole
                break
            hole = os.lseek(fin.fileno(), data_start, os.SEEK_HOLE)
            fin.seek(data_start)
            fout.seek(data_start)
            remaining = hole - data_start
            while remaining:
                chunk = fin.read(min(remaining, 8 * MiB))
                fout.write(chunk)
                remaining -= len(chunk)
            pos = hole
    shutil.copystat(src, tmp)
    tmp.rename(dst)
    return dst
