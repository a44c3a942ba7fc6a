"""The BTT8 driver shim on a real guest: btt8ctl format/attach/detach with nbdkit, the kernel NBD
client and ext4; a corrupt pool refused without a byte written; and power cuts under fio and
the ext4 load on btt8-blk, and the same on the kernel BTT.

One shared guest for the btt8ctl tests; each campaign test is its own short run (one cut)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from vmhelpers import make_vm

from testbed import campaign
from testbed import image as image_mod
from testbed.guest_agent import Agent, stage
from testbed.ndctl import create_namespace
from testbed.targets import BTT8CTL
from testbed.vm import VM

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shim_vm(image: image_mod.Image, vm_base: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VM, str]]:
    """A guest with a 64 MiB devdax namespace (small: mkfs and e2fsck through the shim are
    quick) and the guest packages deployed."""
    vm = make_vm(image, vm_base, f"shim{int(time.time() * 1000) % 100000}", nvdimm_mib=128)
    try:
        vm.start()
        vm.wait_for_ssh(120)
        dax = create_namespace(vm, "devdax", size=64 << 20)
        Agent(*stage(tmp_path_factory.mktemp("guest"))).deploy(vm)
        yield vm, dax
    finally:
        vm.cleanup()


def ctl(vm: VM, *args: str, timeout: float = 300) -> str:
    return vm.succeed(*BTT8CTL, *args, timeout=timeout)


def test_format_attach_ext4_detach_reattach(shim_vm: tuple[VM, str]) -> None:
    vm, dax = shim_vm
    assert "bsize 4096" in ctl(vm, "format", dax, "--bsize", "4096", "--force")
    assert "/dev/btt8a" in ctl(vm, "attach", dax)
    (entry,) = json.loads(ctl(vm, "list", "--json"))
    assert (entry["name"], entry["pool"], entry["server_alive"]) == ("btt8a", dax, True)
    nbd = entry["nbd"].rsplit("/", 1)[1]
    assert vm.succeed("readlink", "/dev/btt8a").strip() == nbd
    for q in ("logical_block_size", "physical_block_size"):  # the BTT8 block is the sector
        assert vm.succeed("cat", f"/sys/block/{nbd}/queue/{q}").strip() == "4096"
    vm.succeed("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "/dev/btt8a", timeout=300)
    vm.succeed("mkdir", "-p", "/mnt/shim")
    vm.succeed("mount", "/dev/btt8a", "/mnt/shim", timeout=120)
    payload = f"through btt8a {time.time_ns()}"
    vm.succeed("python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
               "/mnt/shim/hello", payload)
    assert vm.succeed("cat", "/mnt/shim/hello") == payload
    busy = vm.execute(*BTT8CTL, "detach", "btt8a")  # mounted: refused
    assert busy.rc == 2 and "mounted" in busy.stderr
    vm.succeed("umount", "/mnt/shim", timeout=120)
    assert "detached" in ctl(vm, "detach", "btt8a")
    assert json.loads(ctl(vm, "list", "--json")) == []
    assert vm.execute("test", "-e", "/dev/btt8a").rc == 1
    vm.succeed(*BTT8CTL[:2], "python3", "-m", "btt8", "check", dax)  # metadata intact
    ctl(vm, "attach", dax)
    vm.succeed("mount", "/dev/btt8a", "/mnt/shim", timeout=120)
    assert vm.succeed("cat", "/mnt/shim/hello") == payload
    vm.succeed("umount", "/mnt/shim", timeout=120)
    vm.succeed("e2fsck", "-fn", "/dev/btt8a", timeout=300)
    ctl(vm, "detach", "btt8a")


def test_attach_of_a_corrupt_pool_fails_and_writes_nothing(shim_vm: tuple[VM, str]) -> None:
    vm, dax = shim_vm
    ctl(vm, "format", dax, "--bsize", "4096", "--force")
    # Corrupt the map, not the signature: LBA 1's entry gets LBA 0's PBA (a PBA mapped twice).
    vm.succeed("python3", "-c", (
        "import mmap, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "m = mmap.mmap(fd, 2 << 20)\n"
        "m[4096 + 24:4096 + 32] = m[4096 + 8:4096 + 16]\n"
        "m.close()\n"), dax)
    backing = vm.config.nvdimms[0].backing
    before = hashlib.sha256(backing.read_bytes()).hexdigest()
    r = vm.execute(*BTT8CTL, "attach", dax, timeout=300)
    assert r.rc == 1, r
    assert r.stderr.startswith("btt8ctl: cannot attach") and r.stderr.count("\n") == 1
    assert "nothing was written" in r.stderr
    assert hashlib.sha256(backing.read_bytes()).hexdigest() == before
    assert json.loads(ctl(vm, "list", "--json")) == []
    assert vm.execute("test", "-e", "/dev/btt8a").rc == 1


def _scenario(tmp_path: Path, kind: str, client: str) -> Path:
    """One short cut round: `client` on `kind`."""
    data = yaml.safe_load((REPO / "scenarios" / f"{client}-on-btt8.yaml").read_text())
    data["name"] = f"ci-{client}-{kind}"
    data["target"]["kind"] = kind
    data["cuts"]["count"] = 1
    data["cuts"]["when"] = {"after_s": [1.5, 2.5]}
    data["workload"]["duration_s"] = 40
    if client == "fio":  # a region the target cannot finish before the cut
        data["workload"]["lbas"] = 8192 if kind == "btt8-blk" else 49152
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("kind", ["btt8-blk", "kernel-btt"])
def test_cut_under_fio_passes_fio_verify(image: object, tmp_path: Path, kind: str) -> None:
    code = campaign.run(_scenario(tmp_path, kind, "fio"), tmp_path / "results")
    (run,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert (code, summary["status"], summary["violations"]) == (0, "passed", {}), summary
    recovery = json.loads((run / "cut-1" / "recovery.json").read_text())
    verify = recovery["verify"]
    assert verify["state_files"], "fio's verify state never reached the host"
    assert verify["verified_ios"] > 0 and verify["rc"] == 0, verify  # not a vacuous pass
    events = (run / "cut-1" / "events.jsonl").read_text()
    assert '"ev":"fio-state"' in events and '"complete":false' in events  # cut mid-run


@pytest.mark.parametrize("kind", ["btt8-blk", "kernel-btt"])
def test_cut_under_ext4_load_passes_fsck_and_file_check(image: object, tmp_path: Path,
                                                        kind: str) -> None:
    code = campaign.run(_scenario(tmp_path, kind, "ext4"), tmp_path / "results")
    (run,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert (code, summary["status"], summary["violations"]) == (0, "passed", {}), summary
    recovery = json.loads((run / "cut-1" / "recovery.json").read_text())
    assert recovery["fsck"]["rc"] == 0 and recovery["mount_error"] is None
    verdict = json.loads((run / "cut-1" / "verdict.json").read_text())
    assert verdict["stats"]["acked_writes"] > 0 and recovery["files"], verdict
