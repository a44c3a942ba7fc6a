"""`--shard i/N` slices and `testbed report merge`: shards of a campaign merge into the run
the whole campaign would have made (same cuts, same verdicts, same status and exit code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_results import PHASES, SMOKE, synthetic_cut

from testbed.cli import main
from testbed.results import RunResults, Shard
from testbed.scenario import load_scenario


def test_shards_are_disjoint_and_cover_every_cut() -> None:
    for n in (1, 2, 3, 5, 24):
        slices = [Shard(i, n).cuts(24) for i in range(1, n + 1)]
        assert sorted(c for s in slices for c in s) == list(range(1, 25))
    assert Shard.parse("2/3").cuts(7) == [2, 5]
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


def _run(root: Path, shard: Shard | None, lose_ack_at: int) -> RunResults:
    run = RunResults.create(root, load_scenario(SMOKE), SMOKE, {"accel": "tcg"},
                            run_id=f"shard-{shard.index}" if shard else "whole", shard=shard)
    run.record_phase("first boot", 9.0)
    for n in run.planned:
        run.record_cut(n, synthetic_cut(run.cut_dir(n), n, lose_ack=(n == lose_ack_at)), PHASES)
    run.finish()
    return run


def _verdicts(run_dir: Path) -> dict[int, tuple[bool, dict]]:
    out = {}
    for path in run_dir.glob("cut-*/verdict.json"):
        v = json.loads(path.read_text())
        out[v["cut"]] = (v["ok"], v["counts"])
    return out


def test_merged_shards_match_the_whole_run(tmp_path: Path) -> None:
    whole = _run(tmp_path / "a", None, lose_ack_at=2)
    shards = [_run(tmp_path / "b", Shard(i, 2), lose_ack_at=2) for i in (1, 2)]
    assert [s.planned for s in shards] == [[1, 3], [2]]
    out = tmp_path / "merged"
    code = main(["report", "merge", str(out), *(str(s.run_dir) for s in shards)])
    assert code == 1  # the lost ack of cut 2 (shard 2/2) is the merged run's verdict
    merged = json.loads((out / "summary.json").read_text())
    alone = json.loads((whole.run_dir / "summary.json").read_text())
    for key in ("status", "exit_code", "cuts", "cuts_planned", "violations",
                "cuts_with_violations", "failure"):
        assert merged[key] == alone[key], key
    assert _verdicts(out) == _verdicts(whole.run_dir)
    assert merged["run_phases_s"]["first boot"] == pytest.approx(18.0)  # both shards booted
    assert (out / "report.html").is_file() and (out / "junit.xml").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["merged_from"]) == 2


def test_merge_refuses_overlapping_or_foreign_folders(tmp_path: Path) -> None:
    one = _run(tmp_path / "a", Shard(1, 2), lose_ack_at=0)
    again = _run(tmp_path / "b", Shard(1, 2), lose_ack_at=0)
    assert main(["report", "merge", str(tmp_path / "m1"), str(one.run_dir),
                 str(again.run_dir)]) == 2
    other = tmp_path / "other.yaml"
    other.write_text(SMOKE.read_text().replace("name: smoke", "name: other"))
    foreign = RunResults.create(tmp_path / "c", load_scenario(other), other, {}, run_id="x")
    foreign.finish()
    assert main(["report", "merge", str(tmp_path / "m2"), str(one.run_dir),
                 str(foreign.run_dir)]) == 2
    assert main(["report", "merge", str(tmp_path / "m3")]) == 2


def test_merge_refuses_a_damaged_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shard is read with the same checks as `testbed report`: a truncated verdict of a
    violating cut is reported, not merged around (which would drop that failure)."""
    shards = [_run(tmp_path / "b", Shard(i, 2), lose_ack_at=2) for i in (1, 2)]
    verdict = shards[1].run_dir / "cut-2" / "verdict.json"
    verdict.write_text(verdict.read_text()[:40])
    out = tmp_path / "merged"
    assert main(["report", "merge", str(out), *(str(s.run_dir) for s in shards)]) == 2
    err = capsys.readouterr().err
    assert f"{shards[1].run_dir} is damaged: cut-2/verdict.json: " in err, err
    assert not out.exists()


def test_a_resumed_shard_stays_noted_in_the_merge(tmp_path: Path) -> None:
    shards = [_run(tmp_path / "b", Shard(i, 2), lose_ack_at=0) for i in (1, 2)]
    summary_path = shards[1].run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["resumed"] = [{"at": "2026-11-27T10:00:00+00:00", "cuts_done": 0}]
    summary_path.write_text(json.dumps(summary))
    out = tmp_path / "merged"
    assert main(["report", "merge", str(out), *(str(s.run_dir) for s in shards)]) == 0
    (note,) = json.loads((out / "summary.json").read_text())["resumed"]
    assert note["shard"] == "2/2" and "Resumed" in (out / "report.html").read_text()
