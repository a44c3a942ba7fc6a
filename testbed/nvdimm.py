"""Emulated NVDIMMs: backing files, sizing rules, crash images, in-guest namespaces.

QEMU carves the label area from the end of the memory backend, so a backing file holds
`size + label_size` bytes and the guest sees a region of `size` bytes. Linux aligns pmem regions
to 16 MiB: a region that is not a multiple of it cannot be split into namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from testbed.vm import VM

MiB = 1 << 20
REGION_ALIGN = 16 * MiB
MIN_LABEL_SIZE = 128 * 1024
Mode = Literal["raw", "fsdax", "devdax", "sector"]
MODES: tuple[str, ...] = ("raw", "fsdax", "devdax", "sector")


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


# --- in the guest: ndctl through vm.succeed (argv lists, never shell strings) ---


def region_info(vm: VM, region: str = "region0") -> dict[str, Any]:
    """`ndctl list` of one region with its DIMM mappings and namespaces."""
    out = json.loads(vm.succeed("ndctl", "list", "-R", "-D", "-N", "-r", region) or "{}")
    regions = out.get("regions", []) if isinstance(out, dict) else out
    if not regions:
        raise NvdimmError(f"guest has no NVDIMM region {region}")
    return regions[0]


def _labelled(r: dict[str, Any]) -> bool:
    # A label-less region is one raw namespace without a uuid and has no space left.
    return bool(r.get("available_size")) or any("uuid" in ns for ns in r.get("namespaces", []))


def init_labels(vm: VM, region: str = "region0") -> bool:
    """Initialise the region's label area if it has none (first use of a backing file); True if
    it did. Without labels a region cannot be split into namespaces (DESIGN "Traps seen")."""
    r = region_info(vm, region)
    if _labelled(r):
        return False
    dimms = [m["dimm"] for m in r.get("mappings", [])]
    vm.succeed("ndctl", "disable-region", region)
    vm.succeed("ndctl", "init-labels", "-f", *dimms)
    vm.succeed("ndctl", "enable-region", region)
    return True


def device_path(ns: dict[str, Any]) -> str:
    """/dev path of a namespace from its ndctl JSON (pmemN, pmemN.Ms, daxN.M)."""
    if ns.get("blockdev"):
        return f"/dev/{ns['blockdev']}"
    chardev = ns.get("chardev") or ns.get("daxregion", {}).get("devices", [{}])[0].get("chardev")
    if chardev:
        return f"/dev/{chardev}"
    raise NvdimmError(f"namespace {ns.get('dev')} has no device node: {ns}")


def namespaces(vm: VM, region: str = "region0") -> list[dict[str, Any]]:
    return region_info(vm, region).get("namespaces", [])


def create_namespace(vm: VM, mode: Mode, region: str = "region0",
                     size: int | None = None) -> str:
    """Create a namespace of `mode` (whole free space unless `size`); return its /dev path."""
    if mode not in MODES:
        raise NvdimmError(f"namespace mode must be one of {', '.join(MODES)}, not {mode!r}")
    init_labels(vm, region)
    argv = ["ndctl", "create-namespace", "-r", region, "-m", mode]
    if size is not None:
        argv += ["-s", str(size)]
    return device_path(json.loads(vm.succeed(*argv)))


def destroy_namespaces(vm: VM, region: str = "region0") -> None:
    vm.succeed("ndctl", "destroy-namespace", "all", "-r", region, "-f")
