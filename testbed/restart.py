"""Restart strategies: what a cut does to the machine and how the guest comes back.

    strategy = RESTARTS[scenario.cuts.mode]()
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

from testbed.events import Tail
from testbed.nvdimm import copy_crash_image
from testbed.vm import VM


@dataclass
class Machine:
    """One running guest of a campaign and the event file its QEMU appends to."""

    vm: VM
    events: Path
    tail: Tail = field(init=False)

    def __post_init__(self) -> None:
        self.tail = Tail(self.events)


class Restart:
    name: ClassVar[str]

    def cut(self, machine: Machine, backing: Path, crash_image: Path) -> None:
        """Cut the power now and copy the media as it was at that instant to `crash_image`."""
        raise NotImplementedError

    def restart(self, machine: Machine, boot: Callable[[], Machine], boot_s: float) -> Machine:
        """A guest on the same media, ssh-ready (`boot` starts a new QEMU)."""
        raise NotImplementedError


class QuitRestart(Restart):
    """QMP `quit`: QEMU exits at once, no guest shutdown; a new QEMU boots on the same backing
    file (a cold boot: fresh guest RAM and kernel)."""

    name = "quit"

    def cut(self, machine: Machine, backing: Path, crash_image: Path) -> None:
        machine.vm.crash("quit")
        copy_crash_image(backing, crash_image)

    def restart(self, machine: Machine, boot: Callable[[], Machine], boot_s: float) -> Machine:
        return boot()


class ResetRestart(Restart):
    """QMP `stop` freezes the guest at the cut instant so the media can be copied, then
    `system_reset` (a hard reset, same QEMU process) and `cont`: the guest reboots in place."""

    name = "reset"

    def cut(self, machine: Machine, backing: Path, crash_image: Path) -> None:
        machine.vm.qmp("stop")
        copy_crash_image(backing, crash_image)
        machine.vm.crash("reset")
        machine.vm.qmp("cont")

    def restart(self, machine: Machine, boot: Callable[[], Machine], boot_s: float) -> Machine:
        machine.vm.wait_for_ssh(boot_s)
        return machine


RESTARTS: dict[str, type[Restart]] = {cls.name: cls for cls in (QuitRestart, ResetRestart)}
