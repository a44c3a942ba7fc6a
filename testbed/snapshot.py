"""Internal snapshots of a booted guest, restored instead of booting: a power cycle in ~2 s.

`save` takes an internal snapshot (RAM, device state and the root disk, all inside the root
qcow2 overlay) with the migration capability x-ignore-shared: the NVDIMM is a shared file
mapping, so its bytes are not in the snapshot and keep living on the backing file. `load`, in
a new QEMU started paused (-S) on the same overlay, brings the guest back to the instant of
the snapshot while the media stays as the power cut left it: fresh OS state, persisted media,
which is exactly a power cycle — provided nothing in guest RAM at snapshot time caches pmem
state (no BTT8 process, the kernel BTT or fsdax namespace disabled, no filesystem mounted on
pmem). The target drivers' `detach` guarantees that before `save`.

The overlay holds the disk state of the snapshot too, so every load also rewinds the root disk:
a restored guest never runs on a disk that moved on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.image import cache_root as image_cache_root
from testbed.nvdimm import copy_crash_image

if TYPE_CHECKING:
    from testbed.vm import VM

TAG = "ready"
_IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


class SnapshotError(Exception):
    """QEMU refused to save or load the snapshot."""


def _hmp(vm: VM, command: str) -> None:
    out = vm.qmp("human-monitor-command", {"command-line": command}, timeout=120)
    if str(out).strip():  # HMP answers nothing on success
        raise SnapshotError(f"QEMU {command!r}: {str(out).strip()}")


def save(vm: VM, tag: str = TAG, while_stopped: Callable[[], None] | None = None) -> None:
    """Snapshot the running guest into its overlay; `while_stopped` runs before the guest
    runs on (it sees the overlay and the media exactly as at the snapshot instant)."""
    vm.qmp("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
    vm.qmp("stop")
    _hmp(vm, f"savevm {tag}")
    if while_stopped is not None:
        while_stopped()
    vm.qmp("cont")


def load(vm: VM, tag: str = TAG) -> None:
    """In a QEMU started paused on an overlay holding `tag`: load it and run the guest."""
    vm.qmp("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
    _hmp(vm, f"loadvm {tag}")
    vm.qmp("cont")


class Cache:
    """Snapshots kept across runs: <cache>/<key>/{root.qcow2, nvdimm.img, facts.json}.

    The key hashes everything the snapshot depends on (image, QEMU, accelerator, machine and
    target setup, guest packages); the media at the snapshot instant is kept beside the overlay,
    since the guest state in the snapshot (namespaces, a formatted target) belongs to it. An
    entry is written to a temporary sibling and renamed into place: concurrent runs never see
    half an entry, and the first one stored wins.
    """

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = root / digest
        self.key = key

    @property
    def overlay(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def media(self) -> Path:
        return self.dir / "nvdimm.img"

    def facts(self) -> dict[str, Any] | None:
        """What setup learnt (device, guest kernel, ...), or None when there is no entry."""
        try:
            return json.loads((self.dir / "facts.json").read_text())["facts"]
        except (OSError, ValueError, KeyError):
            return None

    def install(self, overlay: Path, backing: Path) -> None:
        """Copy the entry's overlay and media to where a run's chain of VMs uses them."""
        shutil.copyfile(self.overlay, overlay)
        copy_crash_image(self.media, backing)

    def store(self, overlay: Path, backing: Path, facts: dict[str, Any]) -> None:
        """Keep a chain's overlay and media, taken while the guest is stopped at the snapshot."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}-", dir=self.dir.parent))
        try:
            shutil.copyfile(overlay, tmp / "root.qcow2")
            copy_crash_image(backing, tmp / "nvdimm.img")
            (tmp / "facts.json").write_text(json.dumps({"key": self.key, "facts": facts},
                                                       indent=2) + "\n")
            with contextlib.suppress(OSError):  # an entry stored meanwhile wins
                tmp.rename(self.dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """$TESTBED_SNAPSHOT_CACHE, else next to the image cache (…/testbed/snapshots)."""
    env = os.environ.get("TESTBED_SNAPSHOT_CACHE")
    return Path(env) if env else image_cache_root().parent / "snapshots"
