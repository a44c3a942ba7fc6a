"""Restart strategies on real guests: a snapshot restore is a power cycle, so a seeded campaign
gets the verdicts a cold boot gets; the nightly job's steps run locally, sharded and merged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import campaign

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"


def _campaign(tmp_path: Path, name: str, target: dict[str, Any], restart: str) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data["target"] = target
    data["workload"] = {"threads": 2, "lbas": 8, "mix": {"read": 2, "write": 3, "zero": 1},
                        "ops": 400}
    data["cuts"] = {"count": 2, "restart": restart, "when": {"after_acks": 60}}
    scenario = tmp_path / f"{name}.yaml"
    scenario.write_text(yaml.safe_dump(data))
    results = tmp_path / name
    assert campaign.run(scenario, results) == 0
    (run,) = results.iterdir()
    return run


def _verdicts(run: Path) -> dict[int, tuple[bool, dict]]:
    verdicts = [json.loads(p.read_text()) for p in run.glob("cut-*/verdict.json")]
    return {v["cut"]: (v["ok"], v["counts"]) for v in verdicts}


@pytest.mark.parametrize("target", [{"kind": "btt8", "namespace": "devdax", "bsize": 4096},
                                    {"kind": "kernel-btt", "bsize": 4096}],
                         ids=lambda t: t["kind"])
def test_cold_and_snapshot_restarts_give_identical_verdicts(image: object, tmp_path: Path,
                                                            target: dict[str, Any]) -> None:
    cold = _campaign(tmp_path, "cold", target, "cold")
    warm = _campaign(tmp_path, "snapshot", target, "snapshot")
    assert _verdicts(cold) == _verdicts(warm) == {1: (True, {}), 2: (True, {})}
    for run, restart_phase in ((cold, "boot"), (warm, "restore")):
        summary = json.loads((run / "summary.json").read_text())
        assert restart_phase in summary["phases_s"], summary["phases_s"]
        for n in (1, 2):  # the recovery found what the round wrote: the cut kept the media
            verdict = json.loads((run / f"cut-{n}" / "verdict.json").read_text())
            assert verdict["stats"]["acked_writes"] >= 60


def test_nightly_steps_run_locally_sharded_and_merged(image: object, tmp_path: Path) -> None:
    env = {**os.environ, "NIGHTLY_SCENARIOS": "smoke", "NIGHTLY_RESULTS": str(tmp_path)}
    r = subprocess.run([str(REPO / "bin" / "nightly"), "all", "2"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke-merged" / "summary.json").read_text())
    assert (summary["status"], summary["cuts"], summary["cuts_planned"]) == ("passed", 3, 3)
    shards = sorted(json.loads(p.read_text())["shard"]
                    for p in (tmp_path / "smoke").glob("*/summary.json"))
    assert shards == ["1/2", "2/2"]
