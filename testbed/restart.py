"""Restart strategies: what a cut does to the machine and how the guest comes back.

    strategy = RESTARTS[scenario.cuts.restart]()
    strategy.ready(machine, target)                      # once, after the target is set up
    strategy.cut(machine, nvdimm_backing, crash_image)   # power off now; crash image copied
    machine = strategy.restart(machine, boot, boot_s)    # a guest ready for recovery

Every strategy keeps what the NVDIMM backing file holds at the cut instant: QEMU models no CPU
cache and the backend is a shared file mapping, so every store the guest completed is on the
media (eADR semantics). Adding a strategy is a new class plus its entry in RESTARTS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from testbed import snapshot
from testbed.channel import AgentChannel
from testbed.events import Tail
from testbed.nvdimm import copy_crash_image
from testbed.targets import Target
from testbed.vm import VM


@dataclass
class Machine:
    """One running guest of a campaign: its QEMU, the event file QEMU appends to, and the
    port of the resident agent (the cut loop's guest commands go there, not over SSH)."""

    vm: VM
    events: Path
    agent: AgentChannel
    fresh: bool = True  # booted (not restored): the resident agent must be started
    round_start: int = 0  # where the current round's events begin in `events`
    tail: Tail = field(init=False)

    def __post_init__(self) -> None:
        self.tail = Tail(self.events)

    def next_round(self, start: int) -> None:
        """The port's file goes on (restart `reset`): the next round's events start here."""
        self.round_start = start
        self.tail = Tail(self.events, start)


Boot = Callable[[bool], Machine]  # boot(restore): a new QEMU; restore: from the snapshot


class Restart:
    name: ClassVar[str]
    phase: ClassVar[str] = "boot"  # what the restart is called in the time breakdown
    chain_overlay: ClassVar[bool] = False  # every boot of a chain runs on one root overlay

    def ready(self, machine: Machine, target: Target) -> None:
        """Once, when the target is set up and attached, before the first workload round."""

    def cut(self, machine: Machine, backing: Path, crash_image: Path) -> None:
        """Cut the power now and copy the media as it was at that instant to `crash_image`."""
        machine.vm.crash("quit")
        copy_crash_image(backing, crash_image)

    def restart(self, machine: Machine, boot: Boot, boot_s: float) -> Machine:
        """A guest on the same media, ssh-ready."""
        raise NotImplementedError


class ColdRestart(Restart):
    """QMP `quit`: QEMU exits at once, no guest shutdown; a new QEMU boots on the same backing
    file (a cold boot: fresh guest RAM, kernel and root-disk overlay)."""

    name = "cold"

    def restart(self, machine: Machine, boot: Boot, boot_s: float) -> Machine:
        return boot(False)


class SnapshotRestart(Restart):
    """QMP `quit` like a cold restart, but the new QEMU loads an internal snapshot of the guest
    taken once the target was set up (testbed.snapshot): a power cycle in about two seconds
    instead of a boot. The target is detached for the snapshot, so the restored guest holds no
    pmem state of its own."""

    name = "snapshot"
    phase = "restore"
    chain_overlay = True
    on_saved: Callable[[], None] | None = None  # runs while the guest is stopped at the save

    def ready(self, machine: Machine, target: Target) -> None:
        target.detach(machine.vm)
        snapshot.save(machine.vm, while_stopped=self.on_saved)
        target.attach(machine.vm)

    def restart(self, machine: Machine, boot: Boot, boot_s: float) -> Machine:
        return boot(True)


class ResetRestart(Restart):
    """QMP `stop` freezes the guest at the cut instant so the media can be copied, then
    `system_reset` (a hard reset, same QEMU process) and `cont`: the guest reboots in place."""

    name = "reset"

    def cut(self, machine: Machine, backing: Path, crash_image: Path) -> None:
        machine.vm.qmp("stop")
        copy_crash_image(backing, crash_image)
        machine.vm.crash("reset")
        machine.vm.qmp("cont")

    def restart(self, machine: Machine, boot: Boot, boot_s: float) -> Machine:
        machine.vm.wait_for_ssh(boot_s)
        machine.fresh = True  # the reboot ended the resident agent
        return machine


RESTARTS: dict[str, type[Restart]] = {
    cls.name: cls for cls in (SnapshotRestart, ColdRestart, ResetRestart)
}
