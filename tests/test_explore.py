"""testbed explore: the correct BTT8 has no violation over the whole bounded space; each
injected defect is found, reported with a reproduction that replays, and rendered."""

import json
from pathlib import Path

import pytest

from testbed import cli
from testbed.explore import Explorer, replay, run

FAULTS = ["unpersisted-data", "unpersisted-mapping", "cycle-shift"]


def test_the_correct_btt8_passes_every_crash_state_of_the_bounded_space() -> None:
    """The coverage bar of issue 8: every interleaving with <= 2 preemptions of 2 threads x 3
    operations on one LBA, crossed with every crash state."""
    explorer = Explorer(threads=2, ops=3, lbas=1, preemptions=2, exhaustive=True,
                        max_interleavings=None)
    stats = explorer.explore()
    assert stats.violations == {}
    assert stats.schedules_exhausted and stats.sampled_crash_points == 0
    assert stats.interleavings > 500 and stats.states > 20_000 and stats.judged > 50
    assert {kind for ops in explorer.plan for kind, _ in ops} == {"read", "write"}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_injected_defect_is_found_and_its_reproduction_replays(tmp_path: Path,
                                                                    fault: str) -> None:
    code, out = run(tmp_path, threads=2, ops=3, lbas=1, exhaustive=True,
                    max_interleavings=None, fault=fault)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["exit_code"] == 1 and summary["violations"]
    assert summary["first_violation"]["after_s"] >= 0
    assert [r["kind"] for r in summary["reproductions"]] == sorted(summary["violations"])
    for entry in summary["reproductions"]:
        path = out / entry["file"]
        repro = json.loads(path.read_text())
        assert len(repro["schedule"]) == repro["crash_after_steps"] == len(repro["steps"])
        replayed, verdict, _ = replay(path, test_fault=fault)
        assert replayed == 1 and entry["kind"] in verdict.counts()
    html = (out / "report.html").read_text()
    assert "crash point" in html and "WswapMapping" in html


def test_the_seeds_cycle_shift_is_a_read_that_a_crash_reverts() -> None:
    """Readers never help persist: one returns the value of a swap its writer has not yet
    persisted, and a crash loses it (the oracle judges the read, not only the acks)."""
    stats = Explorer(threads=2, ops=3, lbas=1, exhaustive=True, max_interleavings=None,
                     fault="cycle-shift").explore()
    assert set(stats.violations) == {"read-reverted"}
    steps = [st["label"] for st in stats.shortest["read-reverted"]["steps"]]
    swap = len(steps) - 1 - steps[::-1].index("WswapMapping")  # the swap the crash loses
    assert "RcopyBlock" in steps[swap:] and "WpersistMapping" not in steps[swap:]


def test_replay_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A reproduction found with a test-only fault is refused by the CLI (no command line can
    inject one, exit 2); the same schedule and crash state on the correct BTT8 replays clean."""
    _, out = run(tmp_path, threads=2, ops=3, lbas=1, exhaustive=True, max_interleavings=None,
                 fault="unpersisted-mapping")
    path = out / "violation-1.json"
    assert cli.main(["explore", "--replay", str(path)]) == 2
    assert "test-only fault" in capsys.readouterr().err
    repro = json.loads(path.read_text())
    repro["params"]["fault"] = ""
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(repro))
    assert cli.main(["explore", "--replay", str(clean)]) == 0
    assert "does not reproduce" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["explore", "--replay", str(tmp_path / "bad.json")]) == 2
    assert "not a violation file" in capsys.readouterr().err


def test_cli_summary_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["explore", "--threads", "2", "--ops", "2", "--lbas", "2",
                     "--max-interleavings", "3", "--results", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["interleavings"] == 3 and not summary["complete"]
    for key in ("states", "distinct_images", "interleavings", "violations", "states_per_s",
                "complete", "reproductions"):
        assert key in summary
    assert (tmp_path / summary["run_id"] / "report.html").is_file()
