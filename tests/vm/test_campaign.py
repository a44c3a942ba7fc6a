"""`testbed run` end to end on real guests: the smoke scenario against BTT8 and the kernel's BTT
(both must come out clean), and a deliberately broken BTT8 that the oracle must catch."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from vmhelpers import our_qemus

from testbed import campaign

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"


def _only_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _assert_complete(run: Path, cuts: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cuts"] == cuts
    assert isinstance(summary["cuts_per_min"], float) and summary["cuts_per_min"] > 0
    phases = set(summary["phases_s"])
    assert {"workload", "cut", "recover", "check", "judge"} <= phases, phases
    assert "restore" in phases or "boot" in phases, phases
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("qemu_version", "guest_kernel", "accelerator", "seed", "command_lines"):
        assert manifest.get(key), key
    suite = ET.parse(run / "junit.xml").getroot()
    assert len(suite.findall(".//testcase")) == cuts
    assert "<svg" in (run / "report.html").read_text()
    for n in range(1, cuts + 1):
        cut = run / f"cut-{n}"
        for name in ("console.log", "qmp-events.log", "events.jsonl", "recovery.json",
                     "verdict.json"):
            assert (cut / name).is_file(), cut / name
        events = (cut / "events.jsonl").read_text().splitlines()
        assert any('"ev":"start"' in e for e in events), f"cut {n}: no workload start event"
        assert any('"ev":"ok"' in e for e in events), f"cut {n}: no op acknowledged"
        assert json.loads((cut / "recovery.json").read_text())["ok"] is True
    return summary


def _variant(tmp_path: Path, **target: object) -> Path:
    """smoke.yaml with its target changed (a None value removes the key)."""
    data = yaml.safe_load(SMOKE.read_text())
    merged = {**data["target"], **target}
    data["target"] = {k: v for k, v in merged.items() if v is not None}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_smoke_btt8_devdax_is_clean(image: object, tmp_path: Path) -> None:
    code = campaign.run(SMOKE, tmp_path / "results")
    run = _only_run(tmp_path / "results")
    summary = _assert_complete(run, cuts=3)
    assert (code, summary["violations"], summary["status"]) == (0, {}, "passed")
    acked = sum(json.loads((run / f"cut-{n}" / "verdict.json").read_text())["stats"]
                ["acked_writes"] for n in (1, 2, 3))
    assert acked > 0, "the oracle judged no acknowledged write"


def test_smoke_kernel_btt_is_clean(image: object, tmp_path: Path) -> None:
    scenario = _variant(tmp_path, kind="kernel-btt", namespace=None)
    code = campaign.run(scenario, tmp_path / "results")
    run = _only_run(tmp_path / "results")
    summary = _assert_complete(run, cuts=3)
    assert (code, summary["violations"]) == (0, {})
    assert json.loads((run / "manifest.json").read_text())["device"].endswith("s")


# The short CI version of the nightly known-good matrix: the target x restart x persistence
# combinations no other VM test runs (btt8 snapshot/cold/reset, adr and kernel-BTT snapshot run
# elsewhere). Each must come out clean; a violation here is a testbed or oracle bug.
@pytest.mark.parametrize("target,restart", [
    ({"kind": "kernel-btt", "namespace": None}, "cold"),
    ({"kind": "kernel-btt", "namespace": None}, "reset"),
    ({"persistence": "adr-evict"}, "snapshot"),
], ids=["kernel-btt-cold", "kernel-btt-reset", "btt8-adr-evict"])
def test_known_good_combinations_are_clean(image: object, tmp_path: Path,
                                           target: dict[str, object], restart: str) -> None:
    data = yaml.safe_load(_variant(tmp_path, **target).read_text())
    data["cuts"] = {**data["cuts"], "count": 2, "restart": restart}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    code = campaign.run(scenario, tmp_path / "results")
    summary = _assert_complete(_only_run(tmp_path / "results"), cuts=2)
    assert (code, summary["violations"], summary["status"]) == (0, {}, "passed")


def test_btt8_pool_file_on_fsdax_with_reset_cuts_is_clean(image: object, tmp_path: Path) -> None:
    """The other BTT8 placement (a pool file on ext4 -o dax), the other cut mode (QMP
    system_reset: same QEMU, guest frozen for the crash image, then reset) and the other
    trigger (after N acknowledged writes)."""
    data = yaml.safe_load(SMOKE.read_text())
    data["target"] = {"kind": "btt8", "namespace": "fsdax", "bsize": 4096, "pool_mib": 32}
    data["cuts"] = {"count": 2, "restart": "reset", "when": {"after_acks": 200}}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    code = campaign.run(scenario, tmp_path / "results")
    run = _only_run(tmp_path / "results")
    summary = _assert_complete(run, cuts=2)
    assert (code, summary["violations"]) == (0, {})
    for n in (1, 2):  # each round's events file holds that round only
        epochs = {json.loads(line)["epoch"]
                  for line in (run / f"cut-{n}" / "events.jsonl").read_text().splitlines()}
        assert epochs == {n}
    assert '"RESET"' in (run / "cut-1" / "qmp-events.log").read_text()
    for n in (1, 2):
        verdict = json.loads((run / f"cut-{n}" / "verdict.json").read_text())
        assert verdict["stats"]["acked_writes"] >= 200


def test_broken_btt8_is_caught(image: object, tmp_path: Path) -> None:
    """The write publishes its mapping before the data is copied (test-only fault hook): a
    reader or a cut sees a block that was never written there. Exit 1, violations reported,
    the crash image kept as evidence."""
    code = campaign.run(SMOKE, tmp_path / "results",
                        guest_env={"BTT8_TEST_FAULT": "publish-before-data"})
    run = _only_run(tmp_path / "results")
    summary = json.loads((run / "summary.json").read_text())
    assert code == 1, summary
    assert summary["status"] == "violations"
    assert sum(summary["violations"].values()) > 0
    suite = ET.parse(run / "junit.xml").getroot()
    assert suite.findall(".//failure")
    for verdict_file in run.glob("cut-*/verdict.json"):
        verdict = json.loads(verdict_file.read_text())
        kept = verdict_file.parent / "crash.img"
        assert kept.is_file() == (not verdict["ok"]), verdict_file


def test_guest_that_never_gets_ready_is_a_testbed_failure(image: object, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A boot deadline that cannot be met: exit 2 with the reason recorded, never a pass, and
    no QEMU left behind."""
    data = yaml.safe_load(SMOKE.read_text())
    data["timeouts"]["boot_s"] = 0.5
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("TESTBED_SNAPSHOT_CACHE", str(tmp_path / "snapshots"))  # boot, not load
    code = campaign.run(scenario, tmp_path / "results")
    run = _only_run(tmp_path / "results")
    summary = json.loads((run / "summary.json").read_text())
    assert (code, summary["status"], summary["cuts"]) == (2, "failed", 0)
    assert "not ssh-ready" in summary["failure"]
    assert not our_qemus(f"/testbed-run-{run.name[:32]}-"), "QEMU outlived a failed run"
