"""The nightly workflow: valid YAML, every step a `bin/nightly` verb, every `testbed` command
those verbs run a real CLI command; the matrix names shipped scenarios."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from testbed.cli import main

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"
NIGHTLY = REPO / "bin" / "nightly"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_runs_nightly_on_a_schedule_and_by_hand() -> None:
    triggers = workflow()[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers


def test_every_step_is_a_nightly_verb_and_the_matrix_names_real_scenarios() -> None:
    verbs = set(re.findall(r"^  (\w+)\)", NIGHTLY.read_text(), re.MULTILINE))
    assert {"kvm", "setup", "shard", "merge", "all"} <= verbs
    jobs = workflow()["jobs"]
    runs = [step["run"] for job in jobs.values() for step in job["steps"] if "run" in step]
    used = [line.split()[1] for run in runs for line in run.splitlines()
            if line.startswith("bin/nightly")]
    assert set(used) == {"kvm", "setup", "shard", "merge"} and set(used) <= verbs
    for scenario in jobs["shard"]["strategy"]["matrix"]["scenario"]:
        assert (REPO / "scenarios" / f"{scenario}.yaml").is_file(), scenario
    assert jobs["merge"]["needs"] == "shard"


@pytest.mark.parametrize("command", sorted(set(re.findall(
    r"\.venv/bin/testbed ([a-z]+(?: [a-z]+)?)", NIGHTLY.read_text()))))
def test_every_testbed_command_of_the_nightly_steps_exists(command: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: testbed" in capsys.readouterr().out


def test_unknown_verb_is_an_error() -> None:
    r = subprocess.run([str(NIGHTLY), "nope"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "bin/nightly all" in r.stderr
