"""Scenario loading: valid files round-trip, every invalid one fails with file:line: key."""

from pathlib import Path

import pytest
import yaml

from testbed.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from testbed.targets import make_target

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))

VALID = """\
name: t
seed: 3
target:
  kind: btt8
  bsize: 4096
workload:
  threads: 2
  lbas: 16
  mix: {read: 1, write: 1}
  ops: 100
cuts:
  count: 2
  when: {after_acks: 10}
"""


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "x.yaml")
    return str(info.value)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenarios_load_and_round_trip(path: Path) -> None:
    scenario = load_scenario(path)
    assert parse_scenario(yaml.safe_dump(scenario.to_dict())) == scenario


def test_all_four_shipped_scenarios_exist_with_their_targets() -> None:
    by_name = {p.stem: load_scenario(p) for p in SCENARIOS}
    assert by_name["powercut"].target.kind == "btt8"
    assert by_name["powercut"].target.namespace == "devdax"
    assert by_name["powercut"].cuts.count >= 20
    assert by_name["smoke"].cuts.count <= 3
    assert by_name["kernel-btt"].target.kind == "kernel-btt"
    assert by_name["raw-pmem"].target.kind == "raw-pmem"
    # 4 KiB writes essentially never tear under a QMP cut; the control needs large blocks.
    assert by_name["raw-pmem"].target.bsize >= 65536


def test_defaults_fill_optional_sections() -> None:
    s = parse_scenario(VALID)
    assert isinstance(s, Scenario)
    assert s.target.namespace == "devdax"
    assert s.vm.accel == "auto" and s.vm.nvdimm.size_mib % 16 == 0
    assert s.cuts.restart == "snapshot"
    assert s.cuts.when.after_acks == 10 and s.cuts.when.after_s is None
    assert s.workload.mix.zero == 0.0
    assert s.timeouts.boot_s > 0


def test_valid_scenario_round_trips() -> None:
    s = parse_scenario(VALID)
    assert parse_scenario(yaml.safe_dump(s.to_dict())) == s


def test_unknown_key_names_file_line_and_key() -> None:
    text = VALID.replace("  threads: 2\n", "  threads: 2\n  thraeds: 3\n")
    assert error_of(text).startswith("x.yaml:8: workload.thraeds: unknown key")


def test_unknown_top_level_key() -> None:
    assert error_of(VALID + "extra: 1\n").startswith("x.yaml:14: extra: unknown key")


def test_wrong_type_names_file_line_and_key() -> None:
    text = VALID.replace("threads: 2", "threads: four")
    assert error_of(text) == (
        "x.yaml:7: workload.threads: expected an integer >= 1 and <= 256, got 'four'"
    )


def test_bool_is_not_an_integer() -> None:
    assert "workload.lbas" in error_of(VALID.replace("lbas: 16", "lbas: true"))


def test_missing_required_key() -> None:
    text = VALID.replace("  bsize: 4096\n", "")
    assert error_of(text).startswith("x.yaml:4: target.bsize: required key is missing")


def test_missing_top_level_section() -> None:
    text = VALID.split("cuts:")[0]
    assert error_of(text).startswith("x.yaml:1: cuts: required key is missing")


def test_bad_enum_value() -> None:
    text = VALID.replace("kind: btt8", "kind: ext4")
    assert error_of(text).startswith(
        "x.yaml:4: target.kind: expected one of btt8, kernel-btt, raw-pmem, btt8-blk, "
        "got 'ext4'"
    )


def test_section_of_wrong_shape() -> None:
    assert error_of(VALID.replace("  mix: {read: 1, write: 1}", "  mix: [1, 2]")).startswith(
        "x.yaml:9: workload.mix: expected a mapping, got a list"
    )


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        (
            "  ops: 100\n",
            "  ops: 100\n  duration_s: 5\n",
            "x.yaml:7: workload.ops: give exactly one",
        ),
        ("  ops: 100\n", "", "x.yaml:7: workload.ops: give exactly one"),
        (
            "{after_acks: 10}",
            "{after_acks: 10, after_s: [1, 2]}",
            "x.yaml:13: cuts.when: give exactly",
        ),
        ("{after_acks: 10}", "{after_s: [3, 1]}", "x.yaml:13: cuts.when.after_s: expected a list"),
        ("bsize: 4096", "bsize: 3000", "x.yaml:5: target.bsize: expected a power of two"),
        ("mix: {read: 1, write: 1}", "mix: {read: 0}", "x.yaml:9: workload.mix: expected at least"),
        ("lbas: 16", "lbas: 100000000", "x.yaml:8: workload.lbas: working set of"),
        ("seed: 3", "seed: -1", "x.yaml:2: seed: expected an integer >= 0"),
    ],
)
def test_semantic_errors_are_located(old: str, new: str, where: str) -> None:
    assert old in VALID
    assert error_of(VALID.replace(old, new, 1)).startswith(where)


def test_target_options_are_checked_per_kind() -> None:
    kbtt = VALID.replace("kind: btt8", "kind: kernel-btt")
    assert "kernel-btt sectors are 512 or 4096" in error_of(kbtt.replace("4096", "8192"))
    assert error_of(
        kbtt.replace("  bsize: 4096\n", "  bsize: 4096\n  namespace: fsdax\n")
    ).startswith("x.yaml:6: target.namespace: only valid for kind btt8")
    fsdax = VALID.replace("  bsize: 4096\n", "  bsize: 4096\n  namespace: fsdax\n")
    assert error_of(fsdax).startswith("x.yaml:4: target.pool_mib: required key is missing")
    ok = parse_scenario(fsdax.replace("namespace: fsdax", "namespace: fsdax\n  pool_mib: 64"))
    assert ok.target.pool_mib == 64


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    assert error_of("name: [unclosed\n").startswith("x.yaml:2: (yaml): not valid YAML")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "nope.yaml")


def test_cut_delays_are_seeded_and_inside_the_window() -> None:
    s = load_scenario(SCENARIOS[0].parent / "powercut.yaml")
    lo, hi = s.cuts.when.after_s
    delays = [s.cut_delay_s(n) for n in range(1, 25)]
    assert delays == [s.cut_delay_s(n) for n in range(1, 25)]
    assert all(lo <= d <= hi for d in delays) and len(set(delays)) == 24
    assert parse_scenario(VALID).cut_delay_s(1) is None  # after_acks


def test_workload_config_is_what_the_agent_takes() -> None:
    s = parse_scenario(VALID)
    target = make_target(s.target)
    target.device = "/dev/dax0.0"
    config = s.workload_config(target.agent_target(), "/dev/virtio-ports/tb.events", epoch=2)
    assert config == {
        "target": {"kind": "btt8", "path": "/dev/dax0.0", "bsize": 4096},
        "seed": 3,
        "epoch": 2,
        "threads": 2,
        "lbas": 16,
        "mix": {"read": 1.0, "write": 1.0, "zero": 0.0},
        "resume": [0, 0],
        "events": "/dev/virtio-ports/tb.events",
        "ops": 100,
    }


def test_a_snapshot_restart_that_cannot_restore_safely_is_refused() -> None:
    shim = VALID.replace("kind: btt8", "kind: btt8-blk")
    assert "cuts.restart: snapshot cannot be restored safely" in error_of(shim)
    assert parse_scenario(shim.replace("  count: 2\n", "  count: 2\n  restart: cold\n"))
    kbtt_ext4 = VALID.replace("kind: btt8", "kind: kernel-btt").replace(
        "  bsize: 4096\n", "  bsize: 4096\n  client: ext4\n")
    assert error_of(kbtt_ext4.replace("  count: 2\n", "  count: 2\n  restart: snapshot\n")
                    ).startswith("x.yaml:14: cuts.restart: snapshot cannot")
