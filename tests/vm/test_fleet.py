"""fabric for the fleet: testbed.connect(name) for scripts, `testbed exec` on several guests at
once, and the pinned host key held against a guest whose key changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vmhelpers import our_qemus

import testbed
from testbed import image as image_mod
from testbed import runtime
from testbed.image import write_keys
from testbed.ssh import HostKeyMismatch

pytestmark = pytest.mark.vm

NAMES = ("fleet-a", "fleet-b")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], text=True,
                          capture_output=True, timeout=300, env=os.environ.copy())


@pytest.fixture(scope="module")
def fleet(image: image_mod.Image, vm_base: Path):  # type: ignore[no-untyped-def]
    try:
        for name in NAMES:
            up = _cli("up", "--name", name, "--nvdimm", "64M:devdax")
            assert up.returncode == 0, up.stderr
        yield NAMES
    finally:
        for name in NAMES:
            _cli("down", "--force", name)
        assert not our_qemus(str(vm_base / "run" / NAMES[0]))


def test_connect_returns_a_fabric_connection_to_the_guest(fleet: tuple[str, ...]) -> None:
    with testbed.connect(fleet[0]) as conn:
        listed = json.loads(conn.run("ndctl list", hide=True).stdout)
    assert listed and listed[0]["mode"] == "devdax"


def test_exec_runs_on_every_named_guest_and_on_all(fleet: tuple[str, ...]) -> None:
    r = _cli("exec", *fleet, "--", "cat", "/proc/sys/kernel/hostname")
    assert r.returncode == 0, r.stderr
    assert {line.split("]")[0] + "]" for line in r.stdout.splitlines()} == {
        f"[{name}]" for name in fleet}
    failing = _cli("exec", "--all", "--", "false")
    assert failing.returncode == 2 and all(f"[{n}] exit status 1" in failing.stderr
                                           for n in fleet)


def test_a_changed_guest_host_key_is_refused(fleet: tuple[str, ...], tmp_path: Path) -> None:
    """The guest now presents a key other than the pinned one (here: the pin moved)."""
    write_keys(tmp_path / "other")
    state_file = runtime.state_dir(fleet[1]) / "state.json"
    original = state_file.read_text()
    state = json.loads(original)
    state["known_hosts"] = str(tmp_path / "other" / "known_hosts")
    state_file.write_text(json.dumps(state))
    try:
        with pytest.raises(HostKeyMismatch, match="does not match"):
            testbed.connect(fleet[1])
        assert _cli("exec", fleet[1], "--", "true").returncode == 2
    finally:
        state_file.write_text(original)
    testbed.connect(fleet[1]).close()  # the right pin still works
