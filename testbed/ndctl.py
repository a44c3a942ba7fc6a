"""ndctl in the guest: NVDIMM regions and namespaces (argv lists, never shell strings).

Typed against `Guest`, the one verb these helpers need, so anything that can run a command in
the guest (testbed.vm.VM, a test double of a real shell) can drive them.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

Mode = Literal["raw", "fsdax", "devdax", "sector"]
MODES: tuple[str, ...] = ("raw", "fsdax", "devdax", "sector")


class NdctlError(ValueError):
    """A region or namespace that is missing or unusable."""


class Guest(Protocol):
    def succeed(self, *argv: str, timeout: float = ..., stdin: bytes | None = ...) -> str: ...


def region_info(guest: Guest, region: str = "region0") -> dict[str, Any]:
    """`ndctl list` of one region with its DIMM mappings and namespaces."""
    out = json.loads(guest.succeed("ndctl", "list", "-R", "-D", "-N", "-r", region) or "{}")
    regions = out.get("regions", []) if isinstance(out, dict) else out
    if not regions:
        raise NdctlError(f"guest has no NVDIMM region {region}")
    return regions[0]


def _labelled(r: dict[str, Any]) -> bool:
    # A label-less region is one raw namespace without a uuid and has no space left.
    return bool(r.get("available_size")) or any("uuid" in ns for ns in r.get("namespaces", []))


def init_labels(guest: Guest, region: str = "region0") -> bool:
    """Initialise the region's label area if it has none (first use of a backing file); True if
    it did. A label-less region is one raw namespace: it cannot be split or given a mode."""
    r = region_info(guest, region)
    if _labelled(r):
        return False
    dimms = [m["dimm"] for m in r.get("mappings", [])]
    guest.succeed("ndctl", "disable-region", region)
    guest.succeed("ndctl", "init-labels", "-f", *dimms)
    guest.succeed("ndctl", "enable-region", region)
    return True


def device_path(ns: dict[str, Any]) -> str:
    """/dev path of a namespace from its ndctl JSON (pmemN, pmemN.Ms, daxN.M)."""
    if ns.get("blockdev"):
        return f"/dev/{ns['blockdev']}"
    chardev = ns.get("chardev") or ns.get("daxregion", {}).get("devices", [{}])[0].get("chardev")
    if chardev:
        return f"/dev/{chardev}"
    raise NdctlError(f"namespace {ns.get('dev')} has no device node: {ns}")


def namespaces(guest: Guest, region: str = "region0") -> list[dict[str, Any]]:
    return region_info(guest, region).get("namespaces", [])


def create_namespace(guest: Guest, mode: str, region: str = "region0",
                     size: int | None = None, sector_size: int | None = None) -> str:
    """Create a namespace of `mode` (whole free space unless `size`; `sector_size` for a sector
    namespace, the kernel BTT's block) and return its /dev path."""
    if mode not in MODES:
        raise NdctlError(f"namespace mode must be one of {', '.join(MODES)}, not {mode!r}")
    init_labels(guest, region)
    argv = ["ndctl", "create-namespace", "-r", region, "-m", mode]
    if size is not None:
        argv += ["-s", str(size)]
    if sector_size is not None:
        argv += ["-l", str(sector_size)]
    return device_path(json.loads(guest.succeed(*argv, timeout=120)))


def enable_namespaces(guest: Guest, region: str = "region0") -> None:
    """Enable every namespace of the region (a no-op for enabled ones)."""
    guest.succeed("ndctl", "enable-namespace", "all", "-r", region, timeout=120)


def disable_namespaces(guest: Guest, region: str = "region0") -> None:
    """Disable every namespace of the region: its driver (BTT, pmem, device-dax) lets go of the
    media and keeps no state of it in guest RAM. Idempotent."""
    guest.succeed("ndctl", "disable-namespace", "all", "-r", region, timeout=120)


def destroy_namespaces(guest: Guest, region: str = "region0") -> None:
    guest.succeed("ndctl", "destroy-namespace", "all", "-r", region, "-f")
