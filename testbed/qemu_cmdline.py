"""The typed VM configuration and the QEMU command line built from it (no process handling here).

Every value lands in its own argv element; nothing is ever joined into a shell string. QEMU's own
option syntax uses ',' as separator, so paths and names with ',' are rejected rather than escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from testbed.nvdimm import NvdimmSpec

Accel = Literal["auto", "kvm", "tcg"]
QEMU_BINARY = "qemu-system-x86_64"
# Quiet and probe-free: each skipped probe is seconds under TCG.
DEFAULT_APPEND = (
    "console=ttyS0 quiet loglevel=4 panic=-1 tsc=reliable no_timer_check mitigations=off "
    "random.trust_cpu=on 8250.nr_uarts=1 pci=noaer nowatchdog"
)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class ConfigError(ValueError):
    """A VM configuration that cannot be turned into a safe QEMU command line."""


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port, /dev/virtio-ports/<name> in the guest. Host side: `path` is a
    file QEMU appends to as the guest writes, or with `socket` a unix socket QEMU serves (both
    ways; the host connects when it likes)."""

    name: str
    path: Path
    socket: bool = False


@dataclass
class VMConfig:
    name: str
    kernel: Path
    initrd: Path
    root_disk: Path
    append: str = DEFAULT_APPEND
    memory_mib: int = 1024
    smp: int = 2
    accel: Accel = "auto"
    nvdimms: list[NvdimmSpec] = field(default_factory=list)
    serial_ports: list[SerialPort] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    # A root-disk overlay that outlives the VM (it holds the internal snapshot a chain of VMs
    # restores); None: a fresh overlay in the VM's state dir, deleted at cleanup.
    root_overlay: Path | None = None


@dataclass(frozen=True)
class RunPaths:
    """Per-VM files in its private (0700) state directory."""

    dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qmp_log(self) -> Path:
        return self.dir / "qmp-events.log"

    @property
    def stderr_log(self) -> Path:
        return self.dir / "qemu.stderr"

    @property
    def overlay(self) -> Path:
        return self.dir / "root-overlay.qcow2"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


def _safe(value: str | Path, what: str) -> str:
    text = str(value)
    if "," in text or "\n" in text or "\0" in text:
        raise ConfigError(f"{what} must not contain ',' or control characters: {text!r}")
    return text


class QemuCommandLine:
    """Builds argv for one VM: config + resolved accelerator + ssh port + state paths."""

    def __init__(self, config: VMConfig, paths: RunPaths, *, accel: str, ssh_port: int,
                 binary: str = QEMU_BINARY, paused: bool = False) -> None:
        if not NAME_RE.fullmatch(config.name):
            raise ConfigError(f"bad VM name {config.name!r} (letters, digits, _ . -)")
        if accel not in ("kvm", "tcg"):
            raise ConfigError(f"accelerator must be resolved to kvm or tcg, not {accel!r}")
        self.config = config
        self.paths = paths
        self.accel = accel
        self.ssh_port = ssh_port
        self.binary = binary
        self.paused = paused  # -S: vCPUs stopped until `cont` (a snapshot is loaded first)

    def argv(self) -> list[str]:
        c, p = self.config, self.paths
        nv = bool(c.nvdimms)
        machine = "pc,nvdimm=on" if nv else "pc"
        memory = f"{c.memory_mib}M"
        if nv:
            total = sum(d.backing_size for d in c.nvdimms)
            maxmem_mib = c.memory_mib + -(-total // (1 << 20)) + 1024
            memory += f",slots={max(4, len(c.nvdimms))},maxmem={maxmem_mib}M"
        argv = [
            self.binary,
            "-name", _safe(c.name, "name"),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"{machine},accel={self.accel}",
            "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(c.smp),
            "-m", memory,
            "-kernel", _safe(c.kernel, "kernel"),
            "-initrd", _safe(c.initrd, "initrd"),
            "-append", c.append,
            "-chardev", f"file,id=console,path={_safe(p.console_log, 'console log')}",
            "-serial", "chardev:console",
            "-qmp", f"unix:{_safe(p.qmp_socket, 'QMP socket')},server=on,wait=off",
            "-pidfile", _safe(p.pidfile, "pidfile"),
            # The root disk is shared by every VM; each writes only its own overlay.
            "-drive", f"file={_safe(c.root_overlay or p.overlay, 'overlay')},if=none,id=root,"
                      "format=qcow2,"
                      "cache=unsafe,discard=unmap",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{int(self.ssh_port)}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
        ]
        for i, d in enumerate(c.nvdimms):
            argv += [
                "-object",
                f"memory-backend-file,id=nvmem{i},share=on,"
                f"mem-path={_safe(d.backing, 'NVDIMM backing')},size={d.backing_size}",
                "-device", f"nvdimm,id=nvdimm{i},memdev=nvmem{i},label-size={d.label_size}",
            ]
        if c.serial_ports:
            argv += ["-device", "virtio-serial-pci,id=vser0"]
            for i, port in enumerate(c.serial_ports):
                if not NAME_RE.fullmatch(port.name):
                    raise ConfigError(f"bad virtio-serial port name {port.name!r}")
                backend = "socket,server=on,wait=off" if port.socket else "file"
                argv += [
                    "-chardev", f"{backend},id=vport{i},path={_safe(port.path, 'port file')}",
                    "-device", f"virtserialport,bus=vser0.0,chardev=vport{i},name={port.name}",
                ]
        if self.paused:
            argv.append("-S")
        return argv + list(c.extra_args)
