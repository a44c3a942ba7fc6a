"""testbed explore: the correct BTT8 has no violation; each persistence defect is found."""

import json

import pytest

from testbed.explore import Explorer, run


def test_the_correct_btt8_passes_every_explored_crash_state() -> None:
    stats = Explorer(threads=2, ops=3, lbas=1, max_interleavings=20).explore()
    assert stats.violations == {} and stats.states > 500 and stats.distinct_images > 5


@pytest.mark.parametrize("fault", ["unpersisted-data", "unpersisted-mapping"])
def test_each_persistence_defect_is_found(fault: str) -> None:
    stats = Explorer(threads=2, ops=3, lbas=1, max_interleavings=5, fault=fault).explore()
    assert stats.violations and stats.examples[0]["schedule"] is not None


def test_summary_json_and_exit_code(tmp_path) -> None:
    code, out = run(tmp_path, threads=2, ops=2, lbas=2, max_interleavings=3)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0
    for key in ("states", "distinct_images", "interleavings", "violations", "states_per_s"):
        assert key in summary
