"""`testbed run --resume RUN_DIR`: continue a campaign whose orchestrator died (SIGKILL, Ctrl-C,
a testbed failure) from each chain's last finished cut, in the same run folder, so that the
finished run is the one an uninterrupted run would have made.

What a chain carries from one round to the next, and where a resume gets it back:
- the scenario: the run folder's copy (its sha256 is in the manifest);
- which cuts it runs: the run's shard and `--jobs` (both recorded; chain j takes every
  jobs-th cut of the shard), so cut k gets the seed, ops and cut instant it would have had;
- the per-thread op offsets: replayed from the events of its finished cuts (oracle.next_resume);
- the media and the oracle's initial values: the crash image of its last finished cut (kept in
  RUN_DIR/.resume until the next cut finishes) is recovered again in a new guest, exactly as
  after that cut; the recovery must match the recorded one, whose values the next round
  starts from. Whatever the interrupted round did to the NVDIMM is thereby discarded.
An unfinished cut's folder is discarded and the cut redone. A run is refused (ResumeError,
exit 2, before anything is touched) when it is not a run folder, is damaged, is complete, is
in use by a live `testbed run`, or its scenario or guest packages changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed import events as events_mod
from testbed import oracle
from testbed.guest_agent import stage
from testbed.report import load_run
from testbed.results import (
    EVENTS,
    FAILURE,
    RESUME_DIR,
    RunResults,
    Shard,
    file_sha256,
    lock_run,
)
from testbed.scenario import Scenario, ScenarioError, load_scenario


class ResumeError(Exception):
    """The run folder cannot be resumed: one line, exit 2, the folder untouched."""


@dataclass
class ResumePoint:
    """Where one chain goes on: after `cut`, with the media in `image`."""

    cut: int
    image: Path
    resume: list[int]  # next op index per workload thread


@dataclass
class Resumed:
    scenario: Scenario
    jobs: int
    results: RunResults  # reopened: the finished cuts, locked for this process
    points: dict[int, ResumePoint] = field(default_factory=dict)  # chain index -> point
    command_lines: list[Any] = field(default_factory=list)  # the earlier sessions' QEMUs


def prepare(run_dir: Path, scenario_file: Path | None = None,
            jobs: int | None = None) -> Resumed:
    """Check `run_dir` can be resumed, lock it, discard what an unfinished cut left; the state
    the campaign goes on from. ResumeError (the folder unchanged) when it cannot be resumed."""
    for name in ("scenario.yaml", "manifest.json", "summary.json"):
        if not (run_dir / name).is_file():
            raise ResumeError(f"{run_dir} is not a run folder (no {name})")
    try:
        lock_fd = lock_run(run_dir, create=False)
    except BlockingIOError:
        raise ResumeError(f"{run_dir} is in use: a `testbed run` of it is running") from None
    try:
        resumed = _prepare(run_dir, scenario_file, jobs)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    if lock_fd is None:  # an older folder without one: create it now
        resumed.results.lock()
    else:
        resumed.results._lock_fd = lock_fd
    return resumed


def _prepare(run_dir: Path, scenario_file: Path | None, jobs: int | None) -> Resumed:
    run = load_run(run_dir)
    if run.problems:
        raise ResumeError(f"{run_dir} is damaged: {run.problems[0]}")
    manifest, summary = run.manifest, run.summary
    if "merged_from" in manifest:
        raise ResumeError(f"{run_dir} is merged from shards: resume the shard folders")
    recorded_jobs = manifest.get("jobs")
    if not isinstance(recorded_jobs, int) or recorded_jobs < 1 \
            or not isinstance(manifest.get("scenario_sha256"), str):
        raise ResumeError(f"{run_dir} was made by a testbed that cannot resume it "
                          f"(manifest.json has no `jobs` or `scenario_sha256`)")
    stored = run_dir / "scenario.yaml"
    if file_sha256(stored) != manifest["scenario_sha256"]:
        raise ResumeError(f"{stored} changed since the run started (sha256 differs from "
                          f"manifest.json's): not the campaign this run folder holds")
    if scenario_file is not None and scenario_file.read_bytes() != stored.read_bytes():
        raise ResumeError(f"{scenario_file} differs from the scenario the run started with "
                          f"({stored}): a resume goes on with that one (omit SCENARIO, or "
                          f"start a new run)")
    if jobs is not None and jobs != recorded_jobs:
        raise ResumeError(f"the run ran --jobs {recorded_jobs}; a resume must keep it (each "
                          f"chain's media carries its rounds)")
    try:
        scenario = load_scenario(stored)
    except ScenarioError as e:
        raise ResumeError(str(e)) from e
    if scenario.target.client not in (None, "agent"):
        raise ResumeError(f"resuming a `target.client: {scenario.target.client}` campaign is "
                          f"not supported (its client keeps state across rounds on the host)")
    if scenario.cuts.during == "create":
        raise ResumeError("resuming a `cuts.during: create` campaign is not supported (a round "
                          "may leave no pool, which the next round's format depends on)")
    package_hash = manifest.get("guest_package_sha256")
    with tempfile.TemporaryDirectory(prefix="testbed-stage-") as tmp:
        current_hash = stage(Path(tmp))[1]
    if package_hash is not None and package_hash != current_hash:
        raise ResumeError("the guest packages (guest/btt8, guest/tbagent) changed since the "
                          "run started: the rest would not be the same campaign")
    shard = Shard.parse(summary["shard"]) if summary.get("shard") else None
    results = RunResults(run_dir, scenario, shard)
    done = {c["cut"] for c in run.cuts}
    if summary.get("stopped") or done >= set(results.planned):
        raise ResumeError(f"{run_dir} is complete ({len(done)} of {len(results.planned)} cuts"
                          f"{', stopped' if summary.get('stopped') else ''}): nothing to resume")
    if not done <= set(results.planned):
        raise ResumeError(f"{run_dir} is damaged: cuts {sorted(done - set(results.planned))} "
                          f"are not this run's")
    points = {}
    for j in range(recorded_jobs):
        chain_cuts = results.planned[j::recorded_jobs]
        finished = [c for c in chain_cuts if c in done]
        if finished != chain_cuts[:len(finished)]:
            raise ResumeError(f"{run_dir} is damaged: chain {j + 1} finished cuts {finished} "
                              f"out of order")
        if not finished or len(finished) == len(chain_cuts):
            continue
        image = results.resume_image(j + 1, finished[-1])
        if not image.is_file():
            raise ResumeError(f"{image} is missing: chain {j + 1}'s media after cut "
                              f"{finished[-1]} cannot be restored")
        points[j + 1] = ResumePoint(finished[-1], image, _op_offsets(run_dir, scenario,
                                                                      finished))
    redone = _discard_unfinished(run_dir, results, done, {p.image for p in points.values()})
    results.cuts = sorted(run.cuts, key=lambda c: c["cut"])
    results.run_phases = dict(summary.get("run_phases_s") or {})
    results.elapsed_before = float(summary.get("elapsed_s") or 0.0)
    results.resumed = list(summary.get("resumed") or []) + [{
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "cuts_done": len(done),
        "redone": redone, "previous": summary.get("failure") or (
            "the orchestrator died (status running)" if summary.get("status") == "running"
            else None)}]
    return Resumed(scenario, recorded_jobs, results, points,
                   list(manifest.get("command_lines") or []))


def _op_offsets(run_dir: Path, scenario: Scenario, finished: list[int]) -> list[int]:
    """The chain's per-thread op offsets after its finished cuts, as the run computed them."""
    offsets = [0] * scenario.workload.threads
    for cut in finished:
        try:
            events = events_mod.read(run_dir / f"cut-{cut}" / EVENTS)
        except (OSError, ValueError) as e:
            raise ResumeError(f"{run_dir / f'cut-{cut}' / EVENTS}: {e}") from e
        offsets = oracle.next_resume(events, offsets)
    return offsets


def _discard_unfinished(run_dir: Path, results: RunResults, done: set[int],
                        keep: set[Path]) -> list[int]:
    """An interrupted cut is redone: its folder goes, and so does every crash image that is not
    a chain's resume point (a partial copy, the interrupted cut's); the last failure note is
    kept under another name. The cut numbers whose folder was discarded."""
    redone = []
    for cut in sorted(set(results.planned) - done):
        path = run_dir / f"cut-{cut}"
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        redone.append(cut)
    (run_dir / RESUME_DIR).mkdir(exist_ok=True)
    for image in (run_dir / RESUME_DIR).iterdir():
        if image.name != "lock" and image not in keep:
            image.unlink()
    failure = run_dir / FAILURE
    if failure.is_file():
        n = len(list(run_dir.glob("failure-before-resume-*.txt"))) + 1
        failure.rename(run_dir / f"failure-before-resume-{n}.txt")
    return redone
