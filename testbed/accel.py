"""Accelerator choice: KVM when it really runs guests, else TCG.

/dev/kvm can exist and still hang guests (it does on the CI machines), so `auto` boots a probe
guest under KVM -- the image's kernel and busybox initramfs, printing a marker and powering off --
with a short deadline. The answer is cached per host (kernel release, QEMU binary, /dev/kvm).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.qemu_cmdline import QEMU_BINARY

MARKER = "TESTBED-ACCEL-OK"
PROBE_TIMEOUT = 10.0  # a working KVM prints the marker in about a second


def _cache_file() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "testbed" / "accel.json"


def _host_key(binary: str) -> str:
    qemu = shutil.which(binary) or binary
    try:
        st = os.stat(qemu)
        kvm = os.stat("/dev/kvm")
        return f"{platform.release()}|{qemu}|{st.st_mtime_ns}|{kvm.st_rdev}"
    except OSError:
        return f"{platform.release()}|{qemu}|nokvm"


def kvm_works(kernel: Path, initrd: Path, binary: str = QEMU_BINARY,
              timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot a throwaway guest under KVM; True only if it reaches userspace within `timeout`."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="testbed-accel-") as tmp:
        out = Path(tmp) / "console"
        argv = [
            binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "256",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 rdinit=/bin/busybox -- echo {MARKER}",
            "-chardev", f"file,id=c,path={out}", "-serial", "chardev:c",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return out.exists() and MARKER in out.read_text(errors="replace")


def resolve(accel: str, kernel: Path, initrd: Path, binary: str = QEMU_BINARY) -> str:
    """'kvm' or 'tcg' for the requested accel ('auto' probes once per host, then caches)."""
    if accel in ("kvm", "tcg"):
        return accel
    if accel != "auto":
        raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
    cache = _cache_file()
    key = _host_key(binary)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("host") == key:
            return cached["accel"]
    except (OSError, ValueError, KeyError):
        pass
    chosen = "kvm" if kvm_works(kernel, initrd, binary) else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"host": key, "accel": chosen}) + "\n")
    return chosen
