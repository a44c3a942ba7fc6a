"""target.persistence: parsed for btt8 targets only, handed to the agent, and a workload under
adr / adr-evict killed mid-flight (the DRAM copy dies with the process, as with the guest at a
QMP cut) recovers to a history the oracle judges clean."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent import agent_json, kill_workload_mid_flight

from testbed.events import read as read_events
from testbed.oracle import judge
from testbed.scenario import ScenarioError, parse_scenario
from testbed.targets import make_target

SCENARIO = """\
name: t
seed: 1
target:
  kind: {kind}
  bsize: 4096
  persistence: {persistence}
workload:
  threads: 2
  lbas: 16
  mix: {{read: 1, write: 1}}
  ops: 100
cuts:
  count: 2
  when: {{after_acks: 10}}
"""


def test_persistence_reaches_the_agent_target() -> None:
    s = parse_scenario(SCENARIO.format(kind="btt8", persistence="adr"))
    assert s.target.persistence == "adr"
    driver = make_target(s.target)
    driver.device = "/dev/dax0.0"
    assert driver.agent_target()["persistence"] == "adr"
    eadr = make_target(parse_scenario(SCENARIO.format(kind="btt8", persistence="eadr")).target)
    eadr.device = "/dev/dax0.0"
    assert "persistence" not in eadr.agent_target()


def test_persistence_is_for_btt8_only_and_a_known_model() -> None:
    with pytest.raises(ScenarioError, match="target.persistence: only valid for btt8"):
        parse_scenario(SCENARIO.format(kind="kernel-btt", persistence="adr"), "x.yaml")
    with pytest.raises(ScenarioError, match="target.persistence: expected one of"):
        parse_scenario(SCENARIO.format(kind="btt8", persistence="wbinvd"), "x.yaml")


@pytest.mark.parametrize("persistence", ["adr", "adr-evict"])
def test_sigkill_mid_workload_under_a_cache_model_is_judged_clean(persistence: str,
                                                                  tmp_path: Path) -> None:
    target = {"kind": "btt8", "path": str(tmp_path / "pool"), "bsize": 4096, "pool_mib": 32,
              "persistence": persistence}
    agent_json("prepare", {"target": target, "lbas": 8})
    events_path = tmp_path / "events.jsonl"
    config = {"target": target, "seed": 5, "epoch": 0, "threads": 3, "lbas": 8,
              "mix": {"read": 2.0, "write": 3.0, "zero": 1.0}, "duration_s": 60,
              "resume": [0, 0, 0], "events": str(events_path)}
    kill_workload_mid_flight(config, events_path)
    dump = agent_json("recover-and-dump", {"target": target, "seed": 5, "lbas": 8})
    verdict = judge(config, read_events(events_path), dump)
    assert verdict.ok, verdict.to_json()
    assert verdict.stats["acked_writes"] > 0
