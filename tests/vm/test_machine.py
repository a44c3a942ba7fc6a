"""One shared guest: NVDIMM visible, every namespace mode usable, virtio-serial, QMP, pinned
host key, hard reset."""

from __future__ import annotations

import json
import time

import paramiko
import pytest
from vmhelpers import MiB, pattern_argv

from testbed import image as image_mod
from testbed.ndctl import create_namespace, destroy_namespaces, init_labels, namespaces
from testbed.ssh import HostKeyMismatch, SSHConnection
from testbed.vm import VM, CommandFailed

pytestmark = pytest.mark.vm


def test_ndctl_lists_the_nvdimm(booted: VM):
    out = json.loads(booted.succeed("ndctl", "list", "-R", "-D"))
    assert [d["dev"] for d in out["dimms"]] == ["nmem0"]
    (region,) = out["regions"]
    assert region["size"] == 256 * MiB and region["type"] == "pmem"


@pytest.mark.parametrize("mode,prefix", [
    ("fsdax", "/dev/pmem"), ("devdax", "/dev/dax"), ("sector", "/dev/pmem"), ("raw", "/dev/pmem"),
])
def test_each_namespace_mode_is_created_and_used(booted: VM, mode: str, prefix: str):
    dev = create_namespace(booted, mode, size=48 * MiB)  # type: ignore[arg-type]
    assert dev.startswith(prefix)
    if mode == "sector":
        assert dev.endswith("s")
    pattern = f"testbed-{mode}-{time.time_ns()}"
    booted.succeed(*pattern_argv("write", dev, 8192, pattern))
    assert booted.succeed(*pattern_argv("read", dev, 8192, pattern)) == pattern
    # The bytes reached the NVDIMM backing file on the host (share=on), not just guest RAM.
    if mode != "sector":  # BTT places the block somewhere in its arena
        assert pattern.encode() in booted.config.nvdimms[0].backing.read_bytes()


def test_labels_are_initialised_once(booted: VM):
    init_labels(booted)  # whether or not an earlier test did it (the test runs alone too)
    assert init_labels(booted) is False
    assert all("uuid" in ns for ns in namespaces(booted))


def test_virtio_serial_port_streams_to_the_host_file(booted: VM):
    port = booted.config.serial_ports[0]
    booted.succeed("python3", "-c",
                   "import sys; f = open('/dev/virtio-ports/acks', 'w'); "
                   "f.write(sys.argv[1] + '\\n'); f.flush()", "ack-42")
    deadline = time.monotonic() + 5
    while "ack-42" not in port.path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ack-42\n" in port.path.read_text()


def test_failed_guest_command_carries_rc_and_output(booted: VM):
    with pytest.raises(CommandFailed) as e:
        booted.succeed("sh", "-c", "echo out; echo err >&2; exit 3")
    assert e.value.result.rc == 3 and "out" in e.value.result.stdout and "err" in str(e.value)
    assert "No such file" in booted.fail("ls", "/nonexistent")


def test_argv_is_quoted_not_interpreted_by_a_shell(booted: VM):
    assert booted.succeed("echo", "a; touch /tmp/pwned", "$(id)").strip() == \
        "a; touch /tmp/pwned $(id)"
    booted.fail("test", "-e", "/tmp/pwned")


def test_put_file_and_dir(booted: VM, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.sh").write_text("#!/bin/sh\necho from-dir\n")
    (tmp_path / "d" / "sub" / "x.sh").chmod(0o755)
    (tmp_path / "f.txt").write_text("one file")
    g = booted.ssh()
    g.put_file(tmp_path / "f.txt", "/tmp/f.txt")
    g.put_dir(tmp_path / "d", "/tmp/d")
    assert booted.succeed("cat", "/tmp/f.txt") == "one file"
    assert booted.succeed("/tmp/d/sub/x.sh") == "from-dir\n"


def test_stdin_reaches_the_guest_command(booted: VM):
    assert booted.succeed("sha256sum", stdin=b"abc").startswith("ba7816bf")


def test_qmp_answers_and_events_are_logged(booted: VM):
    assert booted.qmp("query-status")["status"] == "running"
    booted.qmp("stop")
    booted.qmp("cont")
    log = booted.paths.qmp_log.read_text().splitlines()
    events = [json.loads(line) for line in log]
    assert {"STOP", "RESUME"} <= {e["event"] for e in events}
    assert all("host_time" in e for e in events)


def test_wrong_host_key_is_refused(booted: VM, tmp_path):
    image_mod.write_keys(tmp_path)  # a different, unrelated host key under the same alias
    g = SSHConnection(booted.ssh_port, booted.client_key, tmp_path / "known_hosts")  # type: ignore[arg-type]
    with pytest.raises(HostKeyMismatch):
        g.connect(timeout=10)
    assert not g.connected


def test_unknown_client_key_is_refused(booted: VM, tmp_path):
    image_mod.write_keys(tmp_path)
    g = SSHConnection(booted.ssh_port, tmp_path / "id_ed25519", booted.known_hosts)  # type: ignore[arg-type]
    with pytest.raises(paramiko.AuthenticationException):
        g.connect(timeout=10)


def test_reset_reboots_and_the_nvdimm_keeps_its_namespaces(booted: VM):
    before = sorted(ns["uuid"] for ns in namespaces(booted))
    booted.crash("reset")
    booted.wait_for_ssh(120)
    assert sorted(ns["uuid"] for ns in namespaces(booted)) == before
    destroy_namespaces(booted)
    assert namespaces(booted) == []
