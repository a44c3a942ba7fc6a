"""Process lifecycle: no QEMU ever left behind, clear errors for guests that never boot, and the
CLI's up/ssh/status/down keeping NVDIMM media across restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from vmhelpers import make_vm, our_qemus, pattern_argv

from testbed import image as image_mod
from testbed.vm import VMError, VMTimeout

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited, parent not yet reaped
            return True
        time.sleep(0.05)
    return False


def test_boot_timeout_is_clear_then_qmp_quit_leaves_no_process(image, vm_base):
    vm = make_vm(image, vm_base, "quit", nvdimm_mib=16)
    with vm:
        vm.start()
        with pytest.raises(VMTimeout) as e:
            vm.wait_for_ssh(timeout=1.5)
        assert "not ssh-ready" in str(e.value) and "command line: " in str(e.value)
        assert "qemu-system-x86_64" in str(e.value) and "-netdev" in str(e.value)
        pid = vm.pid
        vm.crash("quit")
        assert pid is not None and _gone(pid) and not vm.is_running()
        assert not our_qemus(str(vm.paths.dir))


def test_guest_that_never_boots_fails_with_the_console_tail(image, vm_base):
    from testbed.qemu_cmdline import DEFAULT_APPEND

    vm = make_vm(image, vm_base, "noinit", append=DEFAULT_APPEND + " init=/nonexistent")
    with vm:
        vm.start()
        with pytest.raises(VMError) as e:
            vm.wait_for_ssh(timeout=60)
    text = str(e.value)
    assert "guest console (last lines)" in text and "/nonexistent" in text, text
    assert not our_qemus(str(vm.paths.dir))


def test_sigkill_of_the_orchestrator_leaves_no_qemu(image, vm_base):
    state = vm_base / "orphan"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from testbed import image
        from testbed.vm import VM, VMConfig
        img = image.Image(Path({str(image.dir)!r}))
        vm = VM(VMConfig(name="orphan", kernel=img.kernel, initrd=img.initrd,
                         root_disk=img.root_disk), Path({str(state)!r}))
        vm.start()
        print(vm.pid, flush=True)
        time.sleep(600)
    """)
    orch = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        qemu_pid = int(orch.stdout.readline())  # type: ignore[union-attr]
        assert our_qemus(str(state)) == [qemu_pid]
        orch.send_signal(signal.SIGKILL)
        orch.wait(10)
        assert _gone(qemu_pid), "QEMU outlived its SIGKILLed orchestrator"
    finally:
        orch.kill()
        for pid in our_qemus(str(state)):
            os.kill(pid, signal.SIGKILL)


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=os.environ.copy())


def test_cli_up_ssh_status_down_and_nvdimm_data_survives(image: image_mod.Image, vm_base):
    name = "persist"
    up = _cli("up", "--name", name, "--nvdimm", "64M:fsdax")
    assert up.returncode == 0, up.stderr
    assert "ssh-ready" in up.stderr and "/dev/pmem0" in up.stderr
    try:
        status = json.loads(_cli("status", "--json").stdout)
        (row,) = [r for r in status if r["name"] == name]
        assert row["running"] and row["nvdimms"][0]["device"] == "/dev/pmem0"
        pattern = f"survives-{time.time_ns()}"
        w = _cli("ssh", name, "--", *pattern_argv("write", "/dev/pmem0", 4096, pattern))
        assert w.returncode == 0, w.stderr
        assert "equivalent: ssh -i" in w.stderr and "StrictHostKeyChecking=yes" in w.stderr

        down = _cli("down", name)
        assert down.returncode == 0, down.stderr
        assert not our_qemus(str(vm_base / "run" / name))
        assert _cli("down", name).returncode == 0  # idempotent

        up2 = _cli("up", "--name", name, "--nvdimm", "64M:fsdax")
        assert up2.returncode == 0, up2.stderr
        assert "existing content kept" in up2.stderr
        r = _cli("ssh", name, "--", *pattern_argv("read", "/dev/pmem0", 4096, pattern))
        assert r.returncode == 0 and r.stdout == pattern, r.stderr
    finally:
        _cli("down", "--all")
    assert not our_qemus(str(vm_base / "run"))
    assert "no guests" in _cli("status").stdout


def test_a_busy_forward_port_gets_another_port_every_time(image: image_mod.Image, vm_base,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Another process holds the port free_port() chose, for the first three tries of each of
    ten launches: every launch ends on a free port, none gives up."""
    from testbed import vm as vm_mod

    real_free_port = vm_mod.free_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for i in range(10):
            tries = iter([taken, taken, taken])
            monkeypatch.setattr(vm_mod, "free_port",
                                lambda tries=tries: next(tries, None) or real_free_port())
            vm = make_vm(image, vm_base, f"busyport{i}")
            try:
                vm.start()
                assert vm.is_running() and vm.ssh_port not in (None, taken)
                assert next(tries, None) is None  # all three collisions were met and retried
            finally:
                vm.cleanup()
    assert not our_qemus(str(vm_base / "busyport0"))
