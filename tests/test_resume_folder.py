"""`testbed run --resume RUN_DIR` on the host: what a resume restores from an interrupted run
folder (op offsets, the resume image, the discarded unfinished cut) and every refusal (exit 2,
one line, the folder untouched). tests/vm/test_resume.py kills and resumes a real campaign."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_results import PHASES, SMOKE, synthetic_cut

from testbed import events as events_mod
from testbed import oracle
from testbed.cli import main
from testbed.guest_agent import stage
from testbed.results import RESUME_DIR, RunResults, Shard
from testbed.resume import ResumeError, prepare
from testbed.scenario import load_scenario


def _guest_hash(tmp: Path) -> str:
    return stage(tmp / "stage")[1]


def _interrupted(tmp_path: Path, finished: int, release: bool = True, jobs: int = 1,
                 shard: Shard | None = None, scenario_file: Path = SMOKE) -> RunResults:
    """A run folder as a SIGKILLed orchestrator leaves it: `finished` cuts recorded, each
    chain's last crash image kept, the next cut half done (a cut folder without verdict, a
    partial crash image copy)."""
    scenario = load_scenario(scenario_file)
    run = RunResults.create(tmp_path / "results", scenario, scenario_file,
                            {"jobs": jobs, "guest_package_sha256": _guest_hash(tmp_path)},
                            run_id="r", shard=shard)
    for i, n in enumerate(run.planned[:finished]):
        chain = i % jobs + 1
        image = run.resume_image(chain, n)
        image.write_bytes(b"media after cut %d" % n)
        run.record_cut(n, synthetic_cut(run.cut_dir(n), n, lose_ack=False), PHASES)
        run.keep_resume_point(chain, n)
    if finished < len(run.planned):
        partial = run.cut_dir(run.planned[finished])
        (partial / "console.log").write_text("half a round\n")
        run.resume_image(1, run.planned[finished]).with_suffix(".img.part").write_bytes(b"par")
    if release:  # the orchestrator is dead: its lock is gone
        assert run._lock_fd is not None
        os.close(run._lock_fd)
    return run


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_resume_restores_each_chain_and_discards_the_unfinished_cut(tmp_path: Path) -> None:
    run = _interrupted(tmp_path, finished=1)
    resumed = prepare(run.run_dir)
    try:
        (point,) = resumed.points.values()
        assert point.cut == 1 and point.image == run.resume_image(1, 1)
        events = events_mod.read(run.run_dir / "cut-1" / "events.jsonl")
        assert point.resume == oracle.next_resume(events, [0, 0, 0, 0]) != [0, 0, 0, 0]
        assert not (run.run_dir / "cut-2").exists()  # redone from scratch
        assert sorted(p.name for p in (run.run_dir / RESUME_DIR).iterdir()) == \
            ["chain1-cut1.img", "lock"]
        results = resumed.results
        assert [c["cut"] for c in results.cuts] == [1] and results.planned == [1, 2, 3]
        (note,) = results.resumed
        assert note["cuts_done"] == 1 and note["redone"] == [2]
        assert "died" in note["previous"]
        with pytest.raises(ResumeError, match="in use"):  # a second resume while this runs
            prepare(run.run_dir)
    finally:
        assert resumed.results._lock_fd is not None
        os.close(resumed.results._lock_fd)


def test_jobs_chains_resume_from_their_own_last_cut(tmp_path: Path) -> None:
    run = _interrupted(tmp_path, finished=1, jobs=2)  # chain 1 did cut 1; chain 2 did none
    resumed = prepare(run.run_dir)
    try:
        assert resumed.jobs == 2 and list(resumed.points) == [1]
    finally:
        os.close(resumed.results._lock_fd or -1)
    assert main(["run", "--resume", str(run.run_dir), "--jobs", "1"]) == 2


def test_a_shard_resumes_as_that_shard(tmp_path: Path) -> None:
    run = _interrupted(tmp_path, finished=1, shard=Shard(1, 2))  # cuts 1 and 3 of 3
    resumed = prepare(run.run_dir)
    try:
        assert resumed.results.shard == Shard(1, 2) and resumed.results.planned == [1, 3]
        assert resumed.points[1].cut == 1 and resumed.results.resumed[0]["redone"] == [3]
    finally:
        os.close(resumed.results._lock_fd or -1)


def _refused(capsys: pytest.CaptureFixture[str], run_dir: Path, *extra: str) -> str:
    before = _files(run_dir) if run_dir.is_dir() else None
    assert main(["run", "--resume", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    if before is not None:
        assert _files(run_dir) == before, "a refused resume changed the run folder"
    return err


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted(tmp_path / "a", finished=1)
    other = tmp_path / "other.yaml"
    other.write_text(SMOKE.read_text().replace("count: 3", "count: 4"))
    assert "differs from the scenario" in _refused(capsys, run.run_dir, str(other))
    assert "fixes the shard" in _refused(capsys, run.run_dir, "--shard", "1/2")
    assert "--jobs 1" in _refused(capsys, run.run_dir, "--jobs", "2")
    stored = run.run_dir / "scenario.yaml"
    stored.write_text(stored.read_text().replace("count: 3", "count: 4"))
    assert "changed since the run started" in _refused(capsys, run.run_dir)

    live = _interrupted(tmp_path / "b", finished=1, release=False)  # its orchestrator runs
    assert "in use" in _refused(capsys, live.run_dir)

    complete = _interrupted(tmp_path / "c", finished=3)
    complete.finish()
    assert not (complete.run_dir / RESUME_DIR).exists()  # nothing left to resume
    assert "is complete (3 of 3 cuts)" in _refused(capsys, complete.run_dir)

    for not_a_run in (tmp_path / "missing", tmp_path, other):
        assert "is not a run folder" in _refused(capsys, not_a_run)

    damaged = _interrupted(tmp_path / "d", finished=2)
    (damaged.run_dir / "cut-1" / "verdict.json").write_text('{"cut": 1, "ok": tr')
    assert "is damaged: cut-1/verdict.json: not valid JSON" in _refused(capsys, damaged.run_dir)

    no_image = _interrupted(tmp_path / "e", finished=1)
    no_image.resume_image(1, 1).unlink()
    assert "chain1-cut1.img is missing" in _refused(capsys, no_image.run_dir)

    old = _interrupted(tmp_path / "f", finished=1)
    manifest = json.loads((old.run_dir / "manifest.json").read_text())
    del manifest["jobs"]
    (old.run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot resume it" in _refused(capsys, old.run_dir)

    guest = _interrupted(tmp_path / "g", finished=1)
    manifest = json.loads((guest.run_dir / "manifest.json").read_text())
    manifest["guest_package_sha256"] = "0" * 64
    (guest.run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "guest packages" in _refused(capsys, guest.run_dir)

    creates = _interrupted(tmp_path / "h", finished=1,
                           scenario_file=SMOKE.parent / "btt8-create-cuts.yaml")
    assert "cuts.during: create" in _refused(capsys, creates.run_dir)

    assert main(["run"]) == 2  # neither a scenario nor --resume


def test_only_the_last_crash_image_is_kept_and_only_until_the_run_completes(
        tmp_path: Path) -> None:
    run = _interrupted(tmp_path, finished=2, release=False)
    assert sorted(p.name for p in (run.run_dir / RESUME_DIR).iterdir()) == \
        ["chain1-cut2.img", "chain1-cut3.img.part", "lock"]
    run.record_failure("interrupted")
    assert run.finish() == 2
    assert (run.run_dir / RESUME_DIR / "chain1-cut2.img").is_file()  # resumable
    run.record_cut(3, synthetic_cut(run.cut_dir(3), 3, lose_ack=False), PHASES)
    run.failure = None
    assert run.finish() == 0
    assert not (run.run_dir / RESUME_DIR).exists()
