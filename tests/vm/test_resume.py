"""SIGKILL of the orchestrator mid-campaign, then `testbed run --resume`: no QEMU outlives the
kill, the resume removes the dead run's temp folder, recovers the media from the last finished
cut's crash image and finishes the campaign as one uninterrupted run (same op sequence across
the break, every verdict clean, the same files and summary)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmhelpers import our_qemus

from testbed import events as events_mod
from testbed import oracle
from testbed.results import RESUME_DIR, RunResults
from testbed.scenario import load_scenario

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The campaigns' TMPDIR: short (QEMU's unix sockets live below it) and this test's own, so
    what is left in it is exactly what the campaigns left."""
    path = Path(tempfile.mkdtemp(prefix="tbr", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cli(env: dict[str, str], *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _no_qemu(marker: str, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while our_qemus(marker) and time.monotonic() < end:
        time.sleep(0.1)
    return not our_qemus(marker)


def test_sigkill_after_the_first_cut_then_resume_finishes_the_campaign(
        image: object, tmp_path: Path, short_tmp: Path) -> None:
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    results = tmp_path / "results"
    orch = _cli(env, "run", str(SMOKE), "--results", str(results), "--jobs", "1")
    try:
        deadline = time.monotonic() + 240
        while not list(results.glob("*/cut-1/verdict.json")):
            assert orch.poll() is None, orch.communicate()[1]
            assert time.monotonic() < deadline, "cut 1 never finished"
            time.sleep(0.05)
        orch.send_signal(signal.SIGKILL)
        orch.wait(10)
    finally:
        orch.kill()
    (run,) = results.iterdir()
    assert _no_qemu(str(short_tmp)), "QEMU outlived its SIGKILLed orchestrator"
    (stale,) = short_tmp.glob("testbed-run-*")  # what the SIGKILL left behind
    assert json.loads((run / "summary.json").read_text())["status"] == "running"

    resume = _cli(env, "run", "--resume", str(run))
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert f"removed {stale}" in err and "media restored from its crash image" in err, err
    assert not list(short_tmp.iterdir()), "temp folders left after the resumed run"
    assert _no_qemu(str(short_tmp))

    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["exit_code"], summary["cuts"], summary["cuts_planned"],
            summary["violations"]) == ("passed", 0, 3, 3, {})
    (note,) = summary["resumed"]
    assert note["cuts_done"] >= 1 and "died" in note["previous"]
    fresh = RunResults(tmp_path / "shape", load_scenario(SMOKE)).summary()
    assert set(summary) == set(fresh), "the summary's shape differs from an uninterrupted run's"
    assert not (run / RESUME_DIR).exists()
    assert "Resumed" in (run / "report.html").read_text()

    # One campaign across the break: each cut's threads go on where the previous cut left them
    # (the seeds an uninterrupted run uses), and each is judged clean from the values the
    # previous recovery pinned (which a wrongly restored NVDIMM would contradict).
    base = {p.name for p in (run / "cut-1").iterdir()}
    offsets = [0] * 4
    for n in (1, 2, 3):
        cut = run / f"cut-{n}"
        names = {p.name for p in cut.iterdir()}
        assert names - {p for p in names if p.startswith("recovery-")} == base, (n, names)
        verdict = json.loads((cut / "verdict.json").read_text())
        assert verdict["ok"] and verdict["stats"]["acked_writes"] > 0, verdict
        events = events_mod.read(cut / "events.jsonl")
        first = {}
        for e in events:
            if e.get("ev") == "invoke":
                first.setdefault(e["thread"], e["op"])
        assert all(first.get(t, offsets[t]) == offsets[t] for t in range(4)), (n, first, offsets)
        offsets = oracle.next_resume(events, offsets)
    assert any(p.name.startswith("recovery-") for p in (run / "cut-3").iterdir())

    again = _cli(env, "run", "--resume", str(run))
    _, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "is complete (3 of 3 cuts)" in err, err
