"""The results folder of one run, written so that an interrupted run keeps every finished cut.

results/<run-id>/
  scenario.yaml  manifest.json  summary.json  junit.xml  report.html
  cut-N/  console.log  qmp-events.log  events.jsonl  recovery.json  verdict.json  [crash.img]

The orchestrator writes a cut's logs into `cut_dir(n)` under the names below, then calls
`record_cut`; summary.json is rewritten (atomically) on every change, and the caller re-renders
junit.xml and report.html from the folder (testbed.report.publish), so an interrupted run keeps
every finished cut.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
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

    def __init__(self, run_dir: Path, scenario: Scenario) -> None:
        self.run_dir = run_dir
        self.scenario = scenario
        self.started = time.monotonic()
        self.cuts: list[dict[str, Any]] = []
        self.run_phases: dict[str, float] = {}
        self.failure: str | None = None
        self.stopped: str | None = None  # why the campaign ended early on a verdict
        self.status = "running"

    @classmethod
    def create(
        cls,
        results_root: str | Path,
        scenario: Scenario,
        scenario_path: str | Path,
        manifest: dict[str, Any],
        run_id: str | None = None,
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
        run = cls(run_dir, scenario)
        copy_atomic(Path(scenario_path), run_dir / "scenario.yaml")
        full = {
            "run_id": run_dir.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "testbed": testbed_identity(),
            "scenario": scenario.name,
            "seed": scenario.seed,
            **manifest,
        }
        write_json_atomic(run_dir / "manifest.json", full)
        run._write_summary()
        return run

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
        incomplete = len(self.cuts) < self.scenario.cuts.count
        if incomplete and self.failure is None and self.stopped is None:
            self.failure = f"only {len(self.cuts)} of {self.scenario.cuts.count} cuts finished"
        code = exit_code(violations, self.failure is not None)
        self.status = STATUS[code]
        self._write_summary()
        return code

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
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
            "cuts": len(self.cuts),
            "cuts_planned": self.scenario.cuts.count,
            "cuts_with_violations": sum(1 for c in self.cuts if not c["ok"]),
            "violations": violations,
            "elapsed_s": round(elapsed, 3),
            "cuts_per_min": round(len(self.cuts) / (elapsed / 60), 3) if elapsed > 0 else 0.0,
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "cut_wall_s": {str(c["cut"]): c["wall_s"] for c in self.cuts},
        }

    def _write_summary(self) -> None:
        write_json_atomic(self.run_dir / "summary.json", self.summary())
