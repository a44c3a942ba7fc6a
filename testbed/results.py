"""The results folder of one run, written so that an interrupted run keeps every finished cut.

results/<run-id>/
  scenario.yaml  manifest.json  summary.json  junit.xml  report.html
  cut-N/  console.log  qmp-events.log  events.jsonl  recovery.json  verdict.json  [crash.img]
  .resume/  lock  chainJ-cutN.img   (while the run is unfinished: see `testbed run --resume`)

The orchestrator writes a cut's logs into `cut_dir(n)` under the names below, then calls
`record_cut`; summary.json is rewritten (atomically) on every change, and the caller re-renders
junit.xml and report.html from the folder (testbed.report.publish), so an interrupted run keeps
every finished cut.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed import __version__
from testbed.scenario import Scenario
from testbed.vm import VMError

CONSOLE_LOG = "console.log"
QMP_LOG = "qmp-events.log"
EVENTS = "events.jsonl"
RECOVERY = "recovery.json"
VERDICT = "verdict.json"
CRASH_IMAGE = "crash.img"
FAILURE = "failure.txt"
RESUME_DIR = ".resume"  # the lock, and each chain's last crash image, until the run completes

EXIT_PASS = 0
EXIT_VIOLATIONS = 1
EXIT_TESTBED_FAILURE = 2


STATUS = {EXIT_PASS: "passed", EXIT_VIOLATIONS: "violations", EXIT_TESTBED_FAILURE: "failed"}


def exit_code(violations: int, testbed_failed: bool) -> int:
    """A violation found is 1 whatever happened after it; otherwise a testbed failure is 2,
    never a pass."""
    if violations:
        return EXIT_VIOLATIONS
    return EXIT_TESTBED_FAILURE if testbed_failed else EXIT_PASS


def describe_failure(where: str, error: BaseException) -> tuple[str, str]:
    """(one line saying what failed and where, the full text when there is more to it)."""
    message = error.message if isinstance(error, VMError) else str(error)
    first = message.strip().splitlines()[0] if message.strip() else ""
    line = f"{where}: {type(error).__name__}" + (f": {first[:300]}" if first else "")
    full = str(error).strip()
    return line, full if full != first else ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def progress_line(cut: int, total: int, phase: str, elapsed_s: float, violations: int,
                  eta_s: float | None = None) -> str:
    """`cut 3/24  recover   elapsed 4m07s  eta 6m10s  violations 0`, one line per phase."""
    eta = f"  eta {_duration(eta_s)}" if eta_s is not None else ""
    return (f"cut {cut}/{total}  {phase:<9} elapsed {_duration(elapsed_s)}{eta}  "
            f"violations {violations}")


def shared_mode() -> int:
    """The mode open() gives a new file under the user's umask (mkstemp's is 0600): run
    folders are results meant for sharing, unlike runtime state and keys."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), shared_mode())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        os.fchmod(fd, shared_mode())
    finally:
        os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def testbed_identity() -> dict[str, Any]:
    """Version and git revision of the testbed itself, for the manifest."""
    top = Path(__file__).resolve().parent.parent
    identity: dict[str, Any] = {"version": __version__, "git_rev": None, "git_dirty": None}
    try:
        rev = subprocess.run(
            ["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return identity  # no git: an installed copy
    if rev.returncode == 0:
        identity.update(git_rev=rev.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    return identity


@dataclass(frozen=True)
class Shard:
    """`--shard i/N`: cuts i, i+N, i+2N, ... of the campaign (1-based); the shards of a
    campaign are disjoint, cover every cut, and run exactly the rounds the whole run would."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
            raise ValueError(f"a shard is i/N with 1 <= i <= N, not {text!r}")
        return cls(int(index), int(count))

    def cuts(self, total: int) -> list[int]:
        return list(range(self.index, total + 1, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def lock_run(run_dir: Path, create: bool = True) -> int | None:
    """An exclusive flock on RUN_DIR/.resume/lock, held until the fd is closed or the process
    exits; None if the lock file is missing and `create` is false. BlockingIOError: another
    process holds it."""
    path = run_dir / RESUME_DIR / "lock"
    if create:
        path.parent.mkdir(exist_ok=True)
    elif not path.is_file():
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


class RunResults:
    """One run's folder. Typical use by the orchestrator:

    run = RunResults.create(args.results, scenario, path, manifest)
    run.record_phase("boot", 25.1)              # run-level phases (first boot, deploy)
    for n in range(1, scenario.cuts.count + 1):
        d = run.cut_dir(n)                      # write console.log, events.jsonl, ... here
        run.record_cut(n, verdict.to_json(), {"workload": 6.2, "recover": 9.8, ...},
                       crash_image=img, cut_at_s=5.4)
    return run.finish()                         # or run.record_failure(msg); run.finish()
    """

    def __init__(self, run_dir: Path, scenario: Scenario, shard: Shard | None = None) -> None:
        self.run_dir = run_dir
        self.scenario = scenario
        self.shard = shard
        # The cut numbers this run covers: all of them, or a shard's deterministic slice.
        self.planned = (shard or Shard(1, 1)).cuts(scenario.cuts.count)
        self.started = time.monotonic()
        self.elapsed_s: float | None = None  # fixed elapsed time (a finished or merged run)
        self.cuts: list[dict[str, Any]] = []
        self.run_phases: dict[str, float] = {}
        self.failure: str | None = None
        self.stopped: str | None = None  # why the campaign ended early on a verdict
        self.status = "running"
        self.elapsed_before = 0.0  # a resumed run: what its earlier sessions took
        self.resumed: list[dict[str, Any]] = []  # a resumed run: one note per resume
        self._lock_fd: int | None = None

    @classmethod
    def create(
        cls,
        results_root: str | Path,
        scenario: Scenario,
        scenario_path: str | Path,
        manifest: dict[str, Any],
        run_id: str | None = None,
        shard: Shard | None = None,
    ) -> RunResults:
        root = Path(results_root)
        root.mkdir(parents=True, exist_ok=True)
        base = run_id or f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{scenario.name}"
        run_dir, n = root / base, 1
        while True:
            try:
                run_dir.mkdir()
                break
            except FileExistsError:  # two runs in the same second keep separate folders
                n += 1
                run_dir = root / f"{base}-{n}"
        run = cls(run_dir, scenario, shard)
        run.lock()
        copy_atomic(Path(scenario_path), run_dir / "scenario.yaml")
        full = {
            "run_id": run_dir.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "testbed": testbed_identity(),
            "scenario": scenario.name,
            "scenario_sha256": file_sha256(run_dir / "scenario.yaml"),
            "seed": scenario.seed,
            **manifest,
        }
        write_json_atomic(run_dir / "manifest.json", full)
        run._write_summary()
        return run

    def lock(self) -> None:
        """Hold the run folder for this process (until it exits): a `testbed run --resume` of
        it is refused while this one runs, whatever way this one ends."""
        self._lock_fd = lock_run(self.run_dir)

    def resume_image(self, chain: int, cut: int) -> Path:
        """Where chain `chain` copies the crash image of cut `cut`: kept until the chain's
        next cut finishes, so a resumed run can recover the media from it."""
        return self.run_dir / RESUME_DIR / f"chain{chain}-cut{cut}.img"

    def keep_resume_point(self, chain: int, cut: int) -> None:
        """Cut `cut` of chain `chain` is recorded: its crash image is the chain's resume point,
        the older ones go."""
        keep = self.resume_image(chain, cut)
        for image in keep.parent.glob(f"chain{chain}-cut*.img"):
            if image != keep:
                image.unlink(missing_ok=True)

    def cut_dir(self, n: int) -> Path:
        path = self.run_dir / f"cut-{n}"
        path.mkdir(exist_ok=True)
        return path

    def record_phase(self, phase: str, seconds: float) -> None:
        """Time spent outside any cut (first boot, deploy, image build)."""
        self.run_phases[phase] = self.run_phases.get(phase, 0.0) + seconds
        self._write_summary()

    def record_cut(
        self,
        n: int,
        verdict: dict[str, Any],
        phases: dict[str, float],
        *,
        crash_image: Path | None = None,
        cut_at_s: float | None = None,
        worker: int = 1,
    ) -> None:
        """verdict: `Verdict.to_json()`; phases: seconds per phase of this cut; crash_image:
        kept only when the verdict has violations; cut_at_s: host-measured seconds from the
        workload's start event to the cut (drawn on the timeline)."""
        cut_dir = self.cut_dir(n)
        kept = None
        if crash_image is not None and not verdict["ok"]:
            copy_atomic(crash_image, cut_dir / CRASH_IMAGE)
            kept = CRASH_IMAGE
        record = {
            "cut": n,
            **verdict,
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "wall_s": round(sum(phases.values()), 3),
            "cut_at_s": cut_at_s,
            "crash_image": kept,
            "worker": worker,
        }
        write_json_atomic(cut_dir / VERDICT, record)
        self.cuts = [c for c in self.cuts if c["cut"] != n] + [record]
        self._write_summary()

    def record_failure(self, message: str, detail: str = "") -> None:
        """The testbed itself failed (boot timeout, lost guest, ...): `message` is one line;
        `detail` (command line, output, console tail) goes to failure.txt."""
        self.failure = message
        if detail:
            write_text_atomic(self.run_dir / FAILURE, f"{message}\n\n{detail}\n")
        self._write_summary()

    def record_stop(self, reason: str) -> None:
        """The campaign ended early because of a verdict (the target is unrecoverable)."""
        self.stopped = reason
        self._write_summary()

    def finish(self) -> int:
        violations = sum(sum(c["counts"].values()) for c in self.cuts)
        incomplete = len(self.cuts) < len(self.planned)
        if incomplete and self.failure is None and self.stopped is None:
            self.failure = f"only {len(self.cuts)} of {len(self.planned)} cuts finished"
        code = exit_code(violations, self.failure is not None)
        self.status = STATUS[code]
        if self.elapsed_s is None:  # stop the clock: the report and the last line agree
            self.elapsed_s = self.elapsed_before + time.monotonic() - self.started
        self._write_summary()
        if not incomplete or self.stopped is not None:  # nothing left to resume
            shutil.rmtree(self.run_dir / RESUME_DIR, ignore_errors=True)
        return code

    def summary(self) -> dict[str, Any]:
        elapsed = self.elapsed_s if self.elapsed_s is not None else \
            self.elapsed_before + time.monotonic() - self.started
        violations: dict[str, int] = {}
        phases = dict(self.run_phases)
        for c in self.cuts:
            for kind, count in c["counts"].items():
                violations[kind] = violations.get(kind, 0) + count
            for phase, seconds in c["phases_s"].items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        return {
            "run_id": self.run_dir.name,
            "scenario": self.scenario.name,
            "target": self.scenario.target.kind,
            "status": self.status,
            "exit_code": exit_code(sum(violations.values()), self.failure is not None)
            if self.status != "running"
            else None,
            "failure": self.failure,
            "stopped": self.stopped,
            "shard": str(self.shard) if self.shard else None,
            "cuts": len(self.cuts),
            "cuts_planned": len(self.planned),
            "cuts_with_violations": sum(1 for c in self.cuts if not c["ok"]),
            "violations": violations,
            "elapsed_s": round(elapsed, 3),
            "cuts_per_min": round(len(self.cuts) / (elapsed / 60), 3) if elapsed > 0 else 0.0,
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "run_phases_s": {k: round(v, 3) for k, v in self.run_phases.items()},
            "workers": self._workers(elapsed),
            "cut_wall_s": {str(c["cut"]): c["wall_s"] for c in self.cuts},
            "resumed": self.resumed,
            "at_step": self._steps(),
        }

    def _steps(self) -> dict[str, int] | None:
        """at_step cuts: how many landed at their step, how many rounds ended without reaching
        it (cut idle after the workload, judged like any round, but not a cut at the step)."""
        steps = [c["step"] for c in self.cuts if isinstance(c.get("step"), dict)]
        if not steps:
            return None
        reached = sum(1 for step in steps if step.get("reached"))
        return {"reached": reached, "missed": len(steps) - reached}

    def _workers(self, elapsed: float) -> dict[str, dict[str, Any]]:
        """Per chain of rounds (`--jobs`): cuts, cuts per minute, seconds per phase."""
        workers: dict[str, dict[str, Any]] = {}
        for c in self.cuts:
            w = workers.setdefault(str(c.get("worker", 1)), {"cuts": 0, "phases_s": {}})
            w["cuts"] += 1
            for phase, seconds in c["phases_s"].items():
                w["phases_s"][phase] = round(w["phases_s"].get(phase, 0.0) + seconds, 3)
        for w in workers.values():
            w["cuts_per_min"] = round(w["cuts"] / (elapsed / 60), 3) if elapsed > 0 else 0.0
        return dict(sorted(workers.items(), key=lambda kv: int(kv[0])))

    def _write_summary(self) -> None:
        write_json_atomic(self.run_dir / "summary.json", self.summary())
