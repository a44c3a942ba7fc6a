"""The exit-code contract of `testbed run`, with a failure injected at each phase.

Whatever is not a verdict on the target is exit 2 with one line naming the phase, summary.json
ends `failed` with that reason, and no QEMU is left. A violation found is exit 1 whatever
happens after it: a target left unrecoverable by a cut, a worker thread killed by an exception
the target raised. Faults reach the guest agent only through the test-only `guest_env`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from vmhelpers import our_qemus

from testbed import campaign, ndctl
from testbed.ssh import SSHConnection
from testbed.targets import Btt8OnDevdax

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"


def run_scenario(tmp_path: Path, guest_env: dict[str, str] | None = None,
                 **changes: Any) -> tuple[int, dict[str, Any], Path]:
    """smoke.yaml with top-level sections replaced; (exit code, summary, run folder)."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    # A snapshot cached by an earlier test would skip the very setup a fault is injected into.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTBED_SNAPSHOT_CACHE", str(tmp_path / "snapshots"))
        code = campaign.run(scenario, tmp_path / "results", guest_env=guest_env)
    (run,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert not our_qemus(f"/testbed-run-{run.name[:32]}-"), "QEMU outlived the run"
    return code, json.loads((run / "summary.json").read_text()), run


def assert_failed(code: int, summary: dict[str, Any], where: str, what: str) -> None:
    assert (code, summary["status"]) == (2, "failed"), summary
    assert summary["failure"].startswith(where), summary["failure"]
    assert what in summary["failure"], summary["failure"]
    assert "\n" not in summary["failure"]


pytestmark = pytest.mark.vm


def test_namespace_creation_failure(image: object, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    """A real ndctl failure in the guest: a namespace larger than the region."""
    def too_big(self: Btt8OnDevdax, vm: Any) -> str:
        return ndctl.create_namespace(vm, "devdax", size=1 << 40)

    monkeypatch.setattr(Btt8OnDevdax, "create_namespace", too_big)
    code, summary, run = run_scenario(tmp_path)
    assert_failed(code, summary, "setup: CommandFailed", "ndctl create-namespace")
    assert "rc " in (run / "failure.txt").read_text()  # the output is kept, apart


def test_deploy_over_ssh_failure(image: object, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    def dropped(self: SSHConnection, local: Path, remote: str) -> None:
        raise paramiko.SSHException("Channel closed.")

    monkeypatch.setattr(SSHConnection, "put_dir", dropped)
    code, summary, _ = run_scenario(tmp_path)
    assert_failed(code, summary, "first boot: SSHException", "Channel closed")  # deploy


def test_qemu_dying_mid_workload(image: object, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    original = campaign.Campaign._wait_trigger

    def kill_then_wait(self: campaign.Campaign, machine: Any, *args: Any) -> Any:
        pid = machine.vm.pid
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        return original(self, machine, *args)

    monkeypatch.setattr(campaign.Campaign, "_wait_trigger", kill_then_wait)
    code, summary, _ = run_scenario(tmp_path, cuts={"count": 2, "when": {"after_s": [20, 20]}})
    assert_failed(code, summary, "cut 1 workload", "workload ended before the cut")
    assert summary["cuts"] == 0


def test_agent_printing_garbage(image: object, tmp_path: Path) -> None:
    code, summary, _ = run_scenario(tmp_path, {"TBAGENT_TEST_FAULT": "garbage-output"},
                                    cuts={"count": 1, "when": {"after_s": [0.5, 0.5]}})
    assert_failed(code, summary, "cut 1 recover: ChannelError", "not JSON")


def test_recovery_hanging(image: object, tmp_path: Path) -> None:
    code, summary, run = run_scenario(
        tmp_path, {"TBAGENT_TEST_FAULT": "hang-recovery"},
        cuts={"count": 1, "when": {"after_s": [0.5, 0.5]}},
        timeouts={"boot_s": 300, "workload_s": 60, "recover_s": 20})
    assert_failed(code, summary, "cut 1 recover: VMTimeout", "timed out after 20")
    assert "guest console (last lines)" in (run / "failure.txt").read_text()  # the evidence


def test_worker_killed_by_the_target_is_a_violation(image: object, tmp_path: Path) -> None:
    """Thread 0's target raises ValueError on its 20th write: the thread dies, the others
    finish their ops, the round ends before the trigger. Exit 1, not a quiet pass."""
    code, summary, run = run_scenario(
        tmp_path, {"TBAGENT_TEST_FAULT": "worker-raises"},
        workload={"threads": 2, "lbas": 8, "mix": {"read": 1, "write": 4}, "ops": 60},
        cuts={"count": 1, "when": {"after_acks": 100000}})
    assert (code, summary["status"]) == (1, "violations"), summary
    assert summary["violations"] == {"worker-died": 1}
    verdict = json.loads((run / "cut-1" / "verdict.json").read_text())
    (died,) = verdict["violations"]
    assert "thread 0" in died["detail"] and "ValueError: test fault" in died["detail"]
    assert "Traceback" in died["detail"]


def test_unrecoverable_target_stops_the_campaign_with_exit_1(image: object,
                                                             tmp_path: Path) -> None:
    code, summary, _ = run_scenario(tmp_path, {"TBAGENT_TEST_FAULT": "corrupt-target"})
    assert (code, summary["status"], summary["cuts"]) == (1, "violations", 1), summary
    assert summary["violations"] == {"unrecoverable": 1}
    assert summary["failure"] is None
    assert "stopped after cut 1" in summary["stopped"]


def test_unrecoverable_target_reformatted_when_the_scenario_asks(image: object,
                                                                 tmp_path: Path) -> None:
    code, summary, _ = run_scenario(
        tmp_path, {"TBAGENT_TEST_FAULT": "corrupt-target"},
        cuts={"count": 2, "on_unrecoverable": "reformat", "when": {"after_s": [0.5, 1.0]}})
    assert (code, summary["status"], summary["cuts"]) == (1, "violations", 2), summary
    assert summary["violations"] == {"unrecoverable": 2}
    assert summary["stopped"] is None and summary["failure"] is None
