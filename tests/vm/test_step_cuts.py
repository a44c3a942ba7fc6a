"""Cuts at a chosen PlusCal step and cuts during create, on real guests (issue 8).

The agent holds a thread at the label and the host cuts on its pause event, so a microsecond
window becomes a reproducible cut. The core of it: with the test-only defect "data block not
persisted before the mapping swap", a cut at WpersistMapping under `adr` (the write-back cache
model: an unpersisted line dies with the guest) finds lost acknowledged writes, and the same cut
under `eadr` (what a bare QMP cut gives: every completed store is on the media) finds none.
Runs on the same target and working set share the snapshot cache (one setup each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from btt8.steps import CREATE_LABELS

from testbed import campaign
from testbed.events import read as read_events
from testbed.scenario import parse_scenario

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"
OPS = 30  # per thread per round: thread 0 reaches WpersistMapping at most 30 times a round


def scenario(tmp_path: Path, persistence: str, cuts: dict[str, Any], seed: int = 1,
             name: str = "scenario") -> Path:
    """smoke.yaml on adr or eadr, two writer threads of OPS writes each on eight LBAs."""
    data = yaml.safe_load(SMOKE.read_text())
    data["seed"] = seed
    data["target"]["persistence"] = persistence
    data["workload"] = {"threads": 2, "lbas": 8, "mix": {"write": 1}, "ops": OPS}
    data["cuts"] = cuts
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(path: Path, results: Path, guest_env: dict[str, str] | None = None
        ) -> tuple[int, dict[str, Any], Path]:
    code = campaign.run(path, results, guest_env=guest_env)
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return code, json.loads((run_dir / "summary.json").read_text()), run_dir


def verdict(run_dir: Path, cut: int) -> dict[str, Any]:
    return json.loads((run_dir / f"cut-{cut}" / "verdict.json").read_text())


def test_an_at_step_cut_lands_at_the_step_and_a_step_never_reached_is_recorded(
        image: object, tmp_path: Path) -> None:
    """nth is drawn per cut from [2, 200]: the seed is one whose cut 1 draws an nth thread 0
    reaches (<= 10) and whose cut 2 draws one it cannot (> OPS): cut 1 lands at the step, cut 2
    is cut idle after the round and says so. The correct BTT8 under adr: clean."""
    cuts = {"count": 2, "when": {"at_step": {"label": "WpersistMapping", "thread": 0,
                                             "nth": [2, 200]}}}
    seed = next(seed for seed in range(1, 1000)
                if (steps := [parse_scenario(scenario(tmp_path, "adr", cuts, seed).read_text())
                              .cut_step(c) for c in (1, 2)])
                and steps[0]["nth"] <= 10 and steps[1]["nth"] > OPS)
    path = scenario(tmp_path, "adr", cuts, seed)
    nth = parse_scenario(path.read_text()).cut_step(1)["nth"]
    code, summary, run_dir = run(path, tmp_path / "results")
    assert (code, summary["violations"], summary["cuts"]) == (0, {}, 2), summary
    assert summary["at_step"] == {"reached": 1, "missed": 1}
    (pause,) = [e for e in read_events(run_dir / "cut-1" / "events.jsonl") if e["ev"] == "pause"]
    assert (pause["label"], pause["thread"], pause["nth"], pause["kind"]) == \
        ("WpersistMapping", 0, nth, "write")
    step = verdict(run_dir, 1)["step"]
    assert step["reached"] and step["at"] == {k: pause[k] for k in ("thread", "op", "kind",
                                                                    "lba")}
    # every op thread 0 began before the held one was acknowledged (each of its writes passes
    # WpersistMapping once, its CAS won or lost: nth - 1 earlier ops)
    acked = [e for e in read_events(run_dir / "cut-1" / "events.jsonl")
             if e["ev"] == "ok" and e["thread"] == 0]
    assert pause["op"] >= nth - 1 and [e["op"] for e in acked] == list(range(pause["op"]))
    missed = verdict(run_dir, 2)
    assert missed["step"]["reached"] is False and missed["ok"]
    assert not [e for e in read_events(run_dir / "cut-2" / "events.jsonl") if e["ev"] == "pause"]


@pytest.mark.parametrize("persistence,caught", [("adr", True), ("eadr", False)])
def test_unpersisted_data_is_caught_at_the_step_under_adr_and_missed_under_eadr(
        image: object, tmp_path: Path, persistence: str, caught: bool) -> None:
    """Thread 0 held before WpersistMapping of its 3rd write, right after the swap: its first
    two writes were acknowledged with their data blocks never persisted."""
    cuts = {"count": 1, "when": {"at_step": {"label": "WpersistMapping", "thread": 0,
                                             "nth": 3}}}
    code, summary, run_dir = run(scenario(tmp_path, persistence, cuts), tmp_path / "results",
                                 {"TBAGENT_TEST_FAULT": "unpersisted-data"})
    assert summary["at_step"] == {"reached": 1, "missed": 0}
    if caught:
        assert (code, summary["status"]) == (1, "violations"), summary
        assert summary["violations"].get("lost-ack", 0) >= 1, summary["violations"]
    else:
        assert (code, summary["violations"]) == (0, {}), summary


def test_cuts_during_create_leave_no_pool_or_a_whole_one(image: object, tmp_path: Path) -> None:
    """Each round formats the target through create's steps and is cut at one drawn from the
    seed; open finds no pool (the testbed creates it anew) or a whole empty one."""
    cuts = {"count": 3, "during": "create", "when": {"at_step": {"label": "random"}}}
    path = scenario(tmp_path, "adr", cuts, seed=5)
    drawn = [parse_scenario(path.read_text()).cut_step(c)["label"] for c in (1, 2, 3)]
    code, summary, run_dir = run(path, tmp_path / "results")
    assert (code, summary["violations"], summary["cuts"]) == (0, {}, 3), summary
    assert summary["at_step"] == {"reached": 3, "missed": 0}
    assert set(drawn) != {"CclearSignature"}  # the seed draws a cut that leaves no pool
    for cut, label in enumerate(drawn, 1):
        (pause,) = [e for e in read_events(run_dir / f"cut-{cut}" / "events.jsonl")
                    if e["ev"] == "pause"]
        assert pause["label"] == label in CREATE_LABELS
        stats = verdict(run_dir, cut)["stats"]
        # held before its step: the old (empty) pool before the signature is cleared, none after
        assert stats == ({"empty_pool": 1} if label == "CclearSignature" else {"no_pool": 1})
