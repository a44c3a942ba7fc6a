"""Results folder, summary, JUnit and the HTML report of a synthetic run."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from tbagent.payload import ZERO, Decoded, WriteId

from testbed.oracle import judge
from testbed.report import publish, render_report
from testbed.results import (
    CRASH_IMAGE,
    EVENTS,
    RunResults,
    describe_failure,
    exit_code,
    progress_line,
)
from testbed.scenario import load_scenario

SMOKE = Path(__file__).parent.parent / "scenarios" / "smoke.yaml"
MIX = {"read": 1.0, "write": 1.0, "zero": 0.0}
PHASES = {"boot": 8.0, "workload": 3.5, "cut": 0.2, "recover": 6.1, "judge": 0.05}


def synthetic_cut(cut_dir: Path, epoch: int, lose_ack: bool) -> dict[str, Any]:
    """Two threads writing lba 0 and reading; if lose_ack, recovery shows the older write."""
    config = {"seed": 1, "epoch": epoch, "threads": 2, "lbas": 1, "mix": MIX, "resume": [0, 0]}
    events: list[dict[str, Any]] = [{"ev": "start", "t": 1_000, "epoch": epoch}]
    from tbagent.payload import op_at

    t, last = 2_000, ZERO
    survivors = []
    for thread in (0, 1):
        for op in range(12):
            kind, lba = op_at(1, thread, op, 1, MIX)
            base = {"epoch": epoch, "thread": thread, "op": op, "kind": kind, "lba": lba}
            events.append({"ev": "invoke", "t": t, **base})
            ok = {"ev": "ok", "t": t + 700, **base}
            if kind == "read":
                ok["value"] = last.to_json()
            else:
                last = Decoded("write", WriteId(epoch, thread, op))
                survivors.append(last)
            if not (thread == 1 and op == 11):  # the last op is in flight at the cut
                events.append(ok)
            t += 1_000
    (cut_dir / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))
    acked = [s for s in survivors if s.write_id != (epoch, 1, 11)]
    survivor = acked[-3] if lose_ack else acked[-1]
    recovery = {"ok": True, "blocks": {"0": survivor.to_json()}}
    return judge(config, events, recovery).to_json()


@pytest.fixture
def run(tmp_path: Path) -> RunResults:
    scenario = load_scenario(SMOKE)
    manifest = {
        "qemu": "QEMU emulator version 8.2",
        "kernel": "6.1.0",
        "accel": "tcg",
        "commands": {"qemu": ["qemu-system-x86_64", "-m", "768"]},
    }
    return RunResults.create(tmp_path / "results", scenario, SMOKE, manifest, run_id="r1")


def finish(run: RunResults) -> int:
    """What the orchestrator does at the end: finish, then render from the folder."""
    code = run.finish()
    publish(run.run_dir)
    return code


def record_three_cuts(run: RunResults, tmp_path: Path) -> None:
    image = tmp_path / "nvdimm.img"
    image.write_bytes(b"pmem" * 1024)
    run.record_phase("boot", 25.0)
    for n in (1, 2, 3):
        verdict = synthetic_cut(run.cut_dir(n), n - 1, lose_ack=(n == 2))
        (run.cut_dir(n) / "console.log").write_text("[    0.000000] Linux version 6.1\n")
        run.record_cut(n, verdict, PHASES, crash_image=image, cut_at_s=0.0262)


def test_summary_after_finish_is_the_one_written(run: RunResults, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The orchestrator's last line (summary() after the report is rendered) and summary.json
    report the same elapsed time and rate, however long the rendering took."""
    record_three_cuts(run, tmp_path)
    finish(run)
    later = time.monotonic() + 90.0
    monkeypatch.setattr(time, "monotonic", lambda: later)
    written = json.loads((run.run_dir / "summary.json").read_text())
    now = run.summary()
    assert (now["elapsed_s"], now["cuts_per_min"]) == (written["elapsed_s"],
                                                       written["cuts_per_min"])


def test_layout_summary_and_exit_code(run: RunResults, tmp_path: Path) -> None:
    record_three_cuts(run, tmp_path)
    assert finish(run) == 1
    d = run.run_dir
    assert d.name == "r1"
    assert (d / "scenario.yaml").read_text() == SMOKE.read_text()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["accel"] == "tcg"
    assert manifest["testbed"]["version"] and manifest["testbed"]["git_rev"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["cuts"] == 3 and isinstance(summary["cuts"], int)
    assert summary["violations"] == {"lost-ack": 1}
    assert isinstance(summary["cuts_per_min"], float) and summary["cuts_per_min"] > 0
    assert summary["phases_s"]["boot"] == pytest.approx(25.0 + 3 * 8.0)
    assert summary["phases_s"]["recover"] == pytest.approx(3 * 6.1)
    assert summary["status"] == "violations" and summary["exit_code"] == 1
    # the crash image is kept only for the cut with a violation
    assert [n for n in (1, 2, 3) if (d / f"cut-{n}" / CRASH_IMAGE).exists()] == [2]
    verdict = json.loads((d / "cut-2" / "verdict.json").read_text())
    assert verdict["violations"][0]["kind"] == "lost-ack"
    assert verdict["violations"][0]["contradicts"]["ok_ns"] is not None
    assert not list(d.rglob(".*"))  # no temporary files left behind


def test_junit_parses_with_one_testcase_per_cut(run: RunResults, tmp_path: Path) -> None:
    record_three_cuts(run, tmp_path)
    finish(run)
    suite = ET.parse(run.run_dir / "junit.xml").getroot()
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["cut-1", "cut-2", "cut-3"]
    assert suite.get("failures") == "1" and suite.get("errors") == "0"
    failure = cases[1].find("failure")
    assert failure is not None and "lost-ack" in failure.get("message")
    assert "lba 0" in failure.text


def test_report_is_self_contained_with_timelines_and_phase_plot(
    run: RunResults, tmp_path: Path
) -> None:
    record_three_cuts(run, tmp_path)
    finish(run)
    html = (run.run_dir / "report.html").read_text()
    assert html.count("<svg") == 2 + 3  # phase totals, per-cut stacks, one timeline per cut
    assert 'id="cut-2"' in html and "lost-ack" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")


def test_render_report_rebuilds_from_files_alone(run: RunResults, tmp_path: Path) -> None:
    record_three_cuts(run, tmp_path)
    finish(run)
    page = run.run_dir / "report.html"
    before = page.read_text()
    page.unlink()
    assert render_report(run.run_dir) == page
    assert page.read_text() == before


def test_interrupted_run_keeps_finished_cuts(run: RunResults, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x")
    verdict = synthetic_cut(run.cut_dir(1), 0, lose_ack=False)
    run.record_cut(1, verdict, PHASES, crash_image=image)
    publish(run.run_dir)
    # the process dies here: no finish()
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["cuts"] == 1 and summary["status"] == "running"
    assert ET.parse(run.run_dir / "junit.xml").getroot().findall("testcase")
    assert "cut 1" in (run.run_dir / "report.html").read_text()
    assert not (run.run_dir / "cut-1" / CRASH_IMAGE).exists()


def test_testbed_failure_and_incomplete_runs_are_never_a_pass(
    run: RunResults, tmp_path: Path
) -> None:
    verdict = synthetic_cut(run.cut_dir(1), 0, lose_ack=False)
    run.record_cut(1, verdict, PHASES)
    run.record_failure("guest did not reach ssh within 300 s")
    assert finish(run) == 2
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ssh" in summary["failure"]
    suite = ET.parse(run.run_dir / "junit.xml").getroot()
    assert suite.get("errors") == "1"


def test_clean_complete_run_exits_0(run: RunResults) -> None:
    for n in (1, 2, 3):
        run.record_cut(n, synthetic_cut(run.cut_dir(n), n - 1, lose_ack=False), PHASES)
    assert finish(run) == 0
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["violations"] == {} and summary["status"] == "passed"


def test_short_run_without_failure_is_a_testbed_failure(run: RunResults) -> None:
    run.record_cut(1, synthetic_cut(run.cut_dir(1), 0, lose_ack=False), PHASES)
    assert finish(run) == 2


def test_run_ids_never_collide(tmp_path: Path) -> None:
    scenario = load_scenario(SMOKE)
    a = RunResults.create(tmp_path, scenario, SMOKE, {})
    b = RunResults.create(tmp_path, scenario, SMOKE, {})
    assert a.run_dir != b.run_dir and a.run_dir.name.endswith("smoke")


def test_exit_code_precedence() -> None:
    assert exit_code(0, False) == 0
    assert exit_code(3, False) == 1
    assert exit_code(3, True) == 1  # a violation found stays exit 1 whatever failed after it
    assert exit_code(0, True) == 2


def test_a_violation_then_a_testbed_failure_is_exit_1(run: RunResults) -> None:
    run.record_cut(1, synthetic_cut(run.cut_dir(1), 0, lose_ack=True), PHASES)
    run.record_failure("cut 2 boot: VMTimeout: guest not ssh-ready after 300 s")
    assert finish(run) == 1
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "violations" and "ssh-ready" in summary["failure"]


def test_a_stop_on_a_verdict_is_not_an_incomplete_run(run: RunResults) -> None:
    run.record_cut(1, synthetic_cut(run.cut_dir(1), 0, lose_ack=True), PHASES)
    run.record_stop("campaign stopped after cut 1: the target is unrecoverable")
    assert finish(run) == 1
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["failure"] is None and "unrecoverable" in summary["stopped"]


def test_failure_is_one_line_with_the_details_kept_apart() -> None:
    from testbed.vm import VMTimeout

    error = VMTimeout("guest tb-x not ssh-ready after 5 s", argv=["qemu-system-x86_64", "-m", "1"],
                      console_tail="[ 0.1] Linux version 6.1")
    line, detail = describe_failure("cut 2 boot", error)
    assert line == "cut 2 boot: VMTimeout: guest tb-x not ssh-ready after 5 s"
    assert "Linux version" in detail and "qemu-system-x86_64 -m 1" in detail
    assert describe_failure("setup", OSError(28, "No space left")) == (
        "setup: OSError: [Errno 28] No space left", "")


def test_progress_line() -> None:
    assert progress_line(3, 24, "recover", 247.9, 2) == (
        "cut 3/24  recover   elapsed 4m07s  violations 2"
    )
    assert progress_line(3, 24, "boot", 61, 0, eta_s=370.2) == (
        "cut 3/24  boot      elapsed 1m01s  eta 6m10s  violations 0"
    )


def test_a_violation_without_its_lba_still_renders(run: RunResults, tmp_path: Path) -> None:
    """`lba` is optional in a verdict's violations (found by the damaged-folder property test:
    a dropped key raised KeyError in the report)."""
    record_three_cuts(run, tmp_path)
    path = run.run_dir / "cut-2" / "verdict.json"
    verdict = json.loads(path.read_text())
    del verdict["violations"][0]["lba"]
    path.write_text(json.dumps(verdict))
    publish(run.run_dir)
    assert "lost-ack" in (run.run_dir / "report.html").read_text()


def test_at_step_cuts_are_counted_and_shown(run: RunResults, tmp_path: Path) -> None:
    """A cut that landed at its step and one whose round never reached it: summary.json counts
    them apart, report.html says where each landed (or that it did not)."""
    landed = {"label": "WpersistMapping", "nth": 3, "thread": "any", "reached": True,
              "at": {"thread": 2, "op": 17, "kind": "write", "lba": 5}}
    missed = {"label": "RcopyBlock", "nth": 900, "thread": 1, "reached": False}
    for n, step in ((1, landed), (2, missed)):
        verdict = synthetic_cut(run.cut_dir(n), n - 1, lose_ack=False)
        run.record_cut(n, {**verdict, "step": step}, PHASES, cut_at_s=1.5)
    assert run.summary()["at_step"] == {"reached": 1, "missed": 1}
    publish(run.run_dir)
    html = (run.run_dir / "report.html").read_text()
    assert ("Cut at step WpersistMapping #3 of thread any: thread 2 held there in op 17 "
            "(write of lba 5).") in html
    assert "Step RcopyBlock #900 of thread 1 never reached" in html
