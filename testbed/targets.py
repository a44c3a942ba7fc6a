"""Target drivers: what a campaign cuts the power under, one class per target.

A driver knows its namespace (the ndctl mode, created on the first boot), its first-boot setup
(a filesystem to make, ...), what every boot needs before the agent runs (the device to appear,
a mount), the path the agent opens, the capacity it offers, the agent's `target` object, and
the rules of its own scenario keys. The campaign only calls these verbs, so adding a target is
a new class plus one `register` line.

    target = make_target(spec)            # from the scenario's `target:` section
    target.create_namespace(vm)           # first boot
    target.setup(vm)                      # first boot, once the namespace exists
    target.attach(vm)                     # every boot (also the first), before the agent runs
    agent_config = target.agent_target()  # {"kind", "path", "bsize", ...}
    target.detach(vm)                     # before a snapshot: no target state in guest RAM
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from btt8.core import Btt8Error, Layout

from testbed import ndctl
from testbed.guest_agent import GUEST_ROOT, Agent, stage
from testbed.vm import VM, CommandFailed, GuestCommands

FSDAX_MOUNT = "/mnt/pmem"


@dataclass(frozen=True)
class TargetSpec:
    """The scenario's `target:` keys (which ones a kind accepts is its driver's business)."""

    kind: str
    bsize: int
    namespace: str | None = None  # chooses among the drivers of one kind (btt8: devdax, fsdax)
    pool_mib: int | None = None  # size of a BTT8 pool file
    client: str | None = None  # what drives a block-device target (testbed.clients); agent
    persistence: str | None = None  # btt8: the guest's persistence model (btt8.pmem); eadr


class TargetUnrecoverable(Exception):
    """attach found the target unusable (a corrupt pool refused): after a cut that is an
    `unrecoverable` verdict on the target, not a testbed failure."""


def btt8_capacity(bsize: int, pool_bytes: int) -> int:
    """LBAs of a BTT8 pool of `pool_bytes` (the core's own sizing rule); 0 if too small."""
    try:
        return Layout.for_pool(bsize, pool_bytes).nblocks
    except Btt8Error:
        return 0


class Target:
    kind: ClassVar[str]
    namespace: ClassVar[str | None] = None  # the `target.namespace` value selecting this driver
    namespace_mode: ClassVar[str]  # ndctl mode of the namespace the target lives on
    optional_keys: ClassVar[tuple[str, ...]] = ()  # scenario keys besides kind, bsize, namespace

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.device: str | None = None  # /dev path of the namespace, known after the first boot

    # --- the scenario ---

    @classmethod
    def check(cls, spec: TargetSpec) -> tuple[str, str] | None:
        """(key, message) for a rule of this target that `spec` breaks."""
        return None

    def capacity(self, region_bytes: int) -> int:
        """Blocks of spec.bsize the target offers on a region of `region_bytes`."""
        return region_bytes // self.spec.bsize

    def snapshot_problem(self) -> str | None:
        """Why a snapshot of a guest set up for this target would not restore as a power cycle
        (state of the target left in guest RAM that `detach` does not clear), or None."""
        if self.spec.client in ("fio", "ext4"):
            return (f"the {self.spec.client} client keeps state in the guest that is not "
                    f"detached before a snapshot")
        return None

    # --- the guest ---

    def create_namespace(self, vm: GuestCommands) -> str:
        self.device = ndctl.create_namespace(vm, self.namespace_mode)
        return self.device

    def setup(self, vm: GuestCommands) -> None:
        """First boot, after create_namespace: whatever the target needs made once."""

    def attach(self, vm: GuestCommands) -> None:
        """Every boot or restore: enable the namespace (a restored guest had it disabled) and
        wait for its device (udev-less device nodes may lag the boot)."""
        ndctl.enable_namespaces(vm)
        vm.wait_until_succeeds("test", "-e", self._device(), timeout=60)

    def detach(self, vm: GuestCommands) -> None:
        """Leave nothing of the target in guest RAM (the kernel BTT's maps, a mounted
        filesystem, page cache), so a snapshot taken now restores as a power cycle."""
        ndctl.disable_namespaces(vm)

    @property
    def path(self) -> str:
        """What the agent opens: the device, or a file on it."""
        return self._device()

    def agent_target(self) -> dict[str, Any]:
        """The agent's `target` object (tbagent's T)."""
        target = {"kind": self.kind, "path": self.path, "bsize": self.spec.bsize}
        if self.spec.client and self.spec.client != "agent":
            target["client"] = self.spec.client
        return target

    def _device(self) -> str:
        if self.device is None:
            raise RuntimeError(f"{type(self).__name__}: no namespace yet (create_namespace)")
        return self.device


class Btt8OnDevdax(Target):
    """The BTT8 pool is a whole device-dax namespace (/dev/daxN.M), mmap'd by the agent."""

    kind, namespace, namespace_mode = "btt8", "devdax", "devdax"
    optional_keys: ClassVar[tuple[str, ...]] = ("persistence",)

    @classmethod
    def check(cls, spec: TargetSpec) -> tuple[str, str] | None:
        if spec.bsize % 16:
            return "bsize", f"btt8 blocks are a multiple of 16 bytes, got {spec.bsize}"
        return None

    def capacity(self, region_bytes: int) -> int:
        return btt8_capacity(self.spec.bsize, region_bytes)

    def agent_target(self) -> dict[str, Any]:
        target = super().agent_target()
        if self.spec.persistence and self.spec.persistence != "eadr":
            target["persistence"] = self.spec.persistence
        return target


class Btt8PoolFile(Btt8OnDevdax):
    """The BTT8 pool is a file of pool_mib on ext4 mounted with -o dax (fsdax namespace): no
    page cache between the pool's mmap and the media."""

    namespace, namespace_mode = "fsdax", "fsdax"
    optional_keys = ("pool_mib", "persistence")

    @classmethod
    def check(cls, spec: TargetSpec) -> tuple[str, str] | None:
        if spec.pool_mib is None:
            return "pool_mib", "required key is missing (fsdax pool file size)"
        return super().check(spec)

    def capacity(self, region_bytes: int) -> int:
        assert self.spec.pool_mib is not None
        return super().capacity(min(self.spec.pool_mib << 20, region_bytes))

    def setup(self, vm: GuestCommands) -> None:
        vm.succeed("mkfs.ext4", "-q", "-F", "-b", "4096", self._device(), timeout=120)

    def attach(self, vm: GuestCommands) -> None:
        super().attach(vm)
        vm.succeed("mkdir", "-p", FSDAX_MOUNT)
        vm.succeed("mount", "-o", "dax", self._device(), FSDAX_MOUNT, timeout=120)

    def detach(self, vm: GuestCommands) -> None:
        vm.succeed("umount", FSDAX_MOUNT, timeout=120)
        super().detach(vm)

    @property
    def path(self) -> str:
        return f"{FSDAX_MOUNT}/pool.btt8"

    def agent_target(self) -> dict[str, Any]:
        return {**super().agent_target(), "pool_mib": self.spec.pool_mib}


class KernelBtt(Target):
    """The Linux BTT: a sector-mode namespace (/dev/pmemNs) whose sector is the block, a
    known-good comparator. The agent uses O_DIRECT, so no page cache sits in between."""

    kind, namespace_mode = "kernel-btt", "sector"
    optional_keys = ("client",)
    SECTOR_SIZES = (512, 4096)  # what the kernel BTT offers for 512 / 4096-byte logical blocks

    @classmethod
    def check(cls, spec: TargetSpec) -> tuple[str, str] | None:
        if spec.bsize not in cls.SECTOR_SIZES:
            # A workload block bigger than one sector would legitimately tear.
            return "bsize", f"kernel-btt sectors are 512 or 4096, got {spec.bsize}"
        return None

    def create_namespace(self, vm: GuestCommands) -> str:
        self.device = ndctl.create_namespace(vm, self.namespace_mode,
                                             sector_size=self.spec.bsize)
        return self.device


class RawPmem(Target):
    """Raw /dev/pmemN (an fsdax namespace used as a plain block device, O_DIRECT): no
    atomicity at all, the negative control that must tear."""

    kind, namespace_mode = "raw-pmem", "fsdax"
    optional_keys = ("client",)


BTT8_BLK_NAME = "btt8a"
BTT8CTL = ("env", f"PYTHONPATH={GUEST_ROOT}", "python3", "-m", "btt8.ctl")
BTT8_BLK_SIZES = (512, 1024, 2048, 4096)  # the kernel NBD client's block sizes


class Btt8Blk(Target):
    """The BTT8 driver shim: `btt8ctl` formats the devdax namespace as a BTT8 pool once and,
    every boot, attaches it as /dev/btt8a (nbdkit's Python plugin over the BTT8 core, the
    kernel NBD client in front), a block device like the kernel BTT's. Clients use it with
    O_DIRECT (agent, fio) or through ext4. An attach refused because the pool is corrupt is an
    `unrecoverable` verdict (TargetUnrecoverable)."""

    kind, namespace_mode = "btt8-blk", "devdax"
    optional_keys = ("client",)

    def __init__(self, spec: TargetSpec) -> None:
        super().__init__(spec)
        self._agent: Agent | None = None  # btt8ctl is deployed with the guest packages

    @classmethod
    def check(cls, spec: TargetSpec) -> tuple[str, str] | None:
        if spec.bsize not in BTT8_BLK_SIZES:
            return "bsize", (f"btt8-blk blocks are what the kernel NBD client takes "
                             f"({', '.join(map(str, BTT8_BLK_SIZES))}), got {spec.bsize}")
        return None

    def capacity(self, region_bytes: int) -> int:
        return btt8_capacity(self.spec.bsize, region_bytes)

    def snapshot_problem(self) -> str | None:
        return ("the shim's nbdkit process and kernel NBD device hold the pool in guest RAM; "
                "restoring them from a snapshot is not verified")

    def _deploy(self, vm: GuestCommands) -> None:
        if not isinstance(vm, VM):
            return  # the agent's port: a campaign deployed the packages before it started
        if self._agent is None:
            self._staged = tempfile.TemporaryDirectory(prefix="testbed-btt8-blk-")
            self._agent = Agent(*stage(Path(self._staged.name)))
        self._agent.deploy(vm)

    def setup(self, vm: GuestCommands) -> None:
        self._deploy(vm)
        vm.succeed(*BTT8CTL, "format", self._device(), "--bsize", str(self.spec.bsize),
                   "--force", timeout=300)

    def attach(self, vm: GuestCommands) -> None:
        super().attach(vm)
        self._deploy(vm)
        r = vm.execute(*BTT8CTL, "attach", self._device(), "--name", BTT8_BLK_NAME,
                       timeout=600)
        if r.rc == 1:  # btt8ctl: not an attachable pool (checked read-only, nothing written)
            raise TargetUnrecoverable(r.stderr.strip())
        if r.rc:
            raise CommandFailed("btt8ctl attach failed", r)

    def detach(self, vm: GuestCommands) -> None:
        vm.succeed(*BTT8CTL, "detach", BTT8_BLK_NAME, timeout=300)
        base = getattr(super(), "detach", None)  # the namespace's own detach, if any
        if base is not None:
            base(vm)

    @property
    def path(self) -> str:
        return f"/dev/{BTT8_BLK_NAME}"


TARGETS: dict[str, dict[str | None, type[Target]]] = {}


def register(cls: type[Target]) -> type[Target]:
    TARGETS.setdefault(cls.kind, {})[cls.namespace] = cls
    return cls


for _cls in (Btt8OnDevdax, Btt8PoolFile, KernelBtt, RawPmem, Btt8Blk):
    register(_cls)


def namespaces_of(kind: str) -> tuple[str, ...]:
    """The `target.namespace` choices of a kind; the first is the default. Empty: no choice."""
    return tuple(ns for ns in TARGETS[kind] if ns is not None)


def driver_class(kind: str, namespace: str | None) -> type[Target]:
    choices = namespaces_of(kind)
    return TARGETS[kind][namespace or (choices[0] if choices else None)]


def make_target(spec: TargetSpec) -> Target:
    return driver_class(spec.kind, spec.namespace)(spec)
