"""`testbed replay RUN_DIR/cut-N`: a shell in a guest booted on a copy of a cut's crash image.

The evidence file is never written: the guest gets a copy in a temporary folder. btt8 and
tbagent are deployed, so the target can be opened (recovered) and inspected by hand.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from testbed import image as image_mod
from testbed import ndctl
from testbed.guest_agent import GUEST_ROOT, stage
from testbed.nvdimm import MiB, NvdimmSpec, copy_crash_image
from testbed.results import CRASH_IMAGE
from testbed.scenario import load_scenario
from testbed.ssh import plain_ssh_argv
from testbed.vm import VM


def replay(cut_dir: Path, accel: str = "auto") -> int:
    """Boot, deploy, open an interactive shell; the guest stops when the shell exits."""
    crash = cut_dir / CRASH_IMAGE
    scenario_file = cut_dir.parent / "scenario.yaml"
    if not crash.is_file() or not scenario_file.is_file():
        print(f"testbed: {cut_dir} has no crash image (kept only for cuts with violations) "
              f"or its run has no scenario.yaml", file=sys.stderr)
        return 2
    scenario = load_scenario(scenario_file)
    img = image_mod.build()
    with tempfile.TemporaryDirectory(prefix="testbed-replay-") as tmp:
        work = Path(tmp)
        nvdimm = NvdimmSpec(copy_crash_image(crash, work / "nvdimm0.img"),
                            scenario.vm.nvdimm.size_mib * MiB, scenario.vm.nvdimm.label_kib * 1024)
        with VM.from_image(img, "replay", work / "vm", memory_mib=scenario.vm.memory_mib,
                           smp=scenario.vm.smp, accel=accel, nvdimms=[nvdimm]) as vm:
            vm.start()
            vm.wait_for_ssh(scenario.timeouts.boot_s)
            staged, _ = stage(work / "guest")
            vm.ssh().put_dir(staged, GUEST_ROOT)
            devices = [ndctl.device_path(ns) for ns in ndctl.namespaces(vm) if "uuid" in ns]
            print(f"crash image of {cut_dir} on {', '.join(devices) or 'no namespace'}; "
                  f"try: PYTHONPATH={GUEST_ROOT} python3 -m btt8 check "
                  f"{devices[0] if devices else 'DEVICE'}", file=sys.stderr)
            assert vm.ssh_port is not None
            return subprocess.call(plain_ssh_argv(vm.ssh_port, img.client_key, img.known_hosts))
