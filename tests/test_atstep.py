"""Cuts at a step and cuts during create, on the host: the scenario keys (strict, drawn from the
seed per cut), the agent holding a thread at a label while the others go on, a create killed
at each of its steps (the process dies with its DRAM copy, as the guest does at a QMP cut), and
the judge of a create cut."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from btt8.steps import CREATE_LABELS, READ_LABELS, WRITE_LABELS
from tbagent.payload import ZERO, Decoded, WriteId

from testbed.events import read as read_events
from testbed.oracle import initial_state, judge, judge_create
from testbed.scenario import ScenarioError, parse_scenario

REPO = Path(__file__).resolve().parent.parent
FLAGSHIP = (REPO / "scenarios" / "powercut.yaml").read_text()
RANDOM_WHEN = "  when:\n    after_s: [2.0, 12.0]\n"
BSIZE = 4096


def flagship(when: str, during: str = "", mix: str = "") -> str:
    text = FLAGSHIP.replace(RANDOM_WHEN, f"  when:\n    at_step: {when}\n{during}")
    return text.replace("{read: 4, write: 5, zero: 1}", mix) if mix else text


def test_at_step_keys_and_per_cut_draws() -> None:
    s = parse_scenario(flagship("{label: WpersistMapping, thread: 2, nth: 3}"))
    assert s.cut_step(1) == {"label": "WpersistMapping", "thread": 2, "nth": 3,
                             "hold_s": s.timeouts.workload_s}
    config = s.workload_config({"kind": "btt8"}, "ev", 1)
    assert config["at_step"] == s.cut_step(1)
    drawn = parse_scenario(flagship("{label: random, thread: any, nth: [1, 50]}"))
    steps = [drawn.cut_step(cut) for cut in range(1, 41)]
    assert steps == [drawn.cut_step(cut) for cut in range(1, 41)]  # seed + cut number
    assert {st["thread"] for st in steps} == {None}
    assert len({st["label"] for st in steps}) > 5 and len({st["nth"] for st in steps}) > 10
    assert {st["label"] for st in steps} <= set(READ_LABELS + WRITE_LABELS)
    assert all(1 <= st["nth"] <= 50 for st in steps)
    writes_only = parse_scenario(flagship("{label: random}", mix="{write: 1}"))
    assert {writes_only.cut_step(c)["label"] for c in range(1, 60)} == set(WRITE_LABELS)


@pytest.mark.parametrize("when,during,mix,error", [
    ("{label: WpersistMaping}", "", "",
     "x.yaml:24: cuts.when.at_step.label: expected one of random, Wstart"),
    ("{label: WswapMapping, thread: 4}", "", "",
     "x.yaml:24: cuts.when.at_step.thread: thread 4 does not exist: the round runs 4"),
    ("{label: WswapMapping, thread: some}", "", "", "cuts.when.at_step.thread: expected any"),
    ("{label: WswapMapping, nth: 0}", "", "", "cuts.when.at_step.nth: expected an integer >= 1"),
    ("{label: WswapMapping, nth: [5, 2]}", "", "", "cuts.when.at_step.nth: expected an integer"),
    ("{label: WswapMapping, nth: .nan}", "", "", "cuts.when.at_step.nth: expected an integer"),
    ("{thread: 1}", "", "", "cuts.when.at_step.label: required key is missing"),
    ("{label: RcopyBlock}", "", "{write: 1}",
     "cuts.when.at_step.label: RcopyBlock is never reached by this workload.mix"),
    ("{label: WwriteBlock}", "", "{read: 1, zero: 1}", "WwriteBlock is never reached"),
    ("{label: CwriteTable}", "", "", "CwriteTable is never reached by this workload.mix"),
    ("{label: WswapMapping}", "  during: create\n", "",
     "WswapMapping is never reached by a create (cuts.during: create)"),
    ("{label: CwriteTable, nth: 2}", "  during: create\n", "",
     "cuts.when.at_step.nth: a create passes each of its steps once"),
])
def test_at_step_errors_name_file_line_and_key(when: str, during: str, mix: str,
                                               error: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(flagship(when, during, mix), "x.yaml")
    assert error in str(caught.value)
    assert "\n" not in str(caught.value)


def test_at_step_and_create_cuts_are_for_btt8_only() -> None:
    kernel_btt = FLAGSHIP.replace("kind: btt8\n  namespace: devdax", "kind: kernel-btt")
    with pytest.raises(ScenarioError, match="cuts.when.at_step: steps are btt8's"):
        parse_scenario(kernel_btt.replace(RANDOM_WHEN, "  when: {at_step: {label: Wstart}}\n"))
    with pytest.raises(ScenarioError, match="cuts.during: create cuts format a btt8 target"):
        parse_scenario(kernel_btt.replace(RANDOM_WHEN, RANDOM_WHEN + "  during: create\n"))
    with pytest.raises(ScenarioError, match="cuts.when.after_acks: a create acknowledges"):
        parse_scenario(FLAGSHIP.replace(RANDOM_WHEN, "  when: {after_acks: 3}\n  during: create\n"))


def test_create_cut_config_draws_a_create_step() -> None:
    s = parse_scenario(flagship("{label: random}", "  during: create\n"))
    labels = {s.create_config({"kind": "btt8"}, "ev", cut)["at_step"]["label"]
              for cut in range(1, 40)}
    assert labels == set(CREATE_LABELS)


def agent(command: str, config: dict[str, Any]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tbagent", command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config))
    proc.stdin.close()
    return proc


def agent_json(command: str, config: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tbagent", command], input=json.dumps(config),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(path: Path, ev: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = [e for e in read_events(path) if e["ev"] == ev]
            if found:
                return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {ev} event in {path}")


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Any]:
    target = {"kind": "btt8", "path": str(tmp_path / "pool"), "bsize": BSIZE, "pool_mib": 32}
    assert agent_json("prepare", {"target": target, "lbas": 8})["ok"]
    return target


def workload(target: dict[str, Any], events: Path, at_step: dict[str, Any]) -> dict[str, Any]:
    return {"target": target, "seed": 3, "epoch": 1, "threads": 3, "lbas": 8,
            "mix": {"read": 1.0, "write": 2.0, "zero": 0.5}, "ops": 60, "resume": [0, 0, 0],
            "events": str(events), "at_step": at_step}


def test_the_chosen_thread_holds_at_its_nth_arrival_and_the_others_go_on(
        pool: dict[str, Any], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    step = {"label": "WpersistMapping", "thread": 1, "nth": 3, "hold_s": 3.0}
    config = workload(pool, events, step)
    result = agent_json("workload", config)  # the hold ends after hold_s: no cut came
    history = read_events(events)
    (pause,) = [e for e in history if e["ev"] == "pause"]
    assert (pause["label"], pause["thread"], pause["nth"], pause["kind"]) == \
        ("WpersistMapping", 1, 3, "write")
    # thread 1 reached the label twice before: its third write is the one held
    writes_before = [e for e in history if e["ev"] == "ok" and e["thread"] == 1
                     and e["kind"] == "write" and e["op"] < pause["op"]]
    assert len(writes_before) == 2
    # the other threads ran on while thread 1 held (they finished long before hold_s)
    released = next(e for e in history if e["ev"] == "released")
    others_during = [e for e in history if e["ev"] == "ok" and e["thread"] != 1
                     and pause["t"] < e["t"] < released["t"]]
    assert others_during
    assert released["t"] - pause["t"] >= 3e9
    assert result["ok"]
    assert judge(config, history, agent_json("recover-and-dump", {
        "target": pool, "seed": 3, "lbas": 8})).ok


def test_a_step_never_reached_is_no_pause(pool: dict[str, Any], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    step = {"label": "WwriteBlock", "thread": None, "nth": 10_000, "hold_s": 60.0}
    assert agent_json("workload", workload(pool, events, step))["ok"]
    assert not [e for e in read_events(events) if e["ev"] in ("pause", "released")]


@pytest.mark.parametrize("persistence", ["eadr", "adr"])
@pytest.mark.parametrize("label", CREATE_LABELS)
def test_a_create_killed_at_any_step_leaves_the_old_pool_or_none(
        pool: dict[str, Any], tmp_path: Path, label: str, persistence: str) -> None:
    """The pool under it has data; the create formats it in place (as a devdax device: no
    pool_mib) and is SIGKILLed while held before the label's step (the process's DRAM copy
    dies with it, as a guest's does at a QMP cut)."""
    filled = workload(pool, tmp_path / "fill.jsonl", {})
    del filled["at_step"]
    assert agent_json("workload", filled)["ok"]
    dump = {"target": pool, "seed": 3, "lbas": 8}
    old = initial_state(agent_json("recover-and-dump", dump))
    assert any(value != ZERO for value in old.values())
    events = tmp_path / "events.jsonl"
    in_place = {k: v for k, v in pool.items() if k != "pool_mib"}
    creator = agent("create", {"target": {**in_place, "persistence": persistence}, "seed": 3,
                               "epoch": 2, "events": str(events),
                               "at_step": {"label": label, "thread": None, "nth": 1,
                                           "hold_s": 60.0}})
    assert wait_for(events, "pause")["label"] == label
    creator.kill()
    creator.wait(30)
    verdict = judge_create(2, agent_json("recover-and-dump", dump), old)
    assert verdict.ok, verdict.to_json()
    # before the signature is cleared the old pool is intact; after, there is none until the
    # last step (held before it: not yet)
    assert verdict.stats == ({"old_pool": 1} if label == "CclearSignature" else {"no_pool": 1})


def test_a_create_that_completes_leaves_an_empty_pool(pool: dict[str, Any],
                                                      tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    assert agent_json("create", {"target": {**pool, "persistence": "adr"}, "seed": 3,
                                 "epoch": 2, "events": str(events)})["ok"]
    assert [e["ev"] for e in read_events(events)] == ["start", "done"]
    recovery = agent_json("recover-and-dump", {"target": pool, "seed": 3, "lbas": 8})
    assert judge_create(2, recovery).stats == {"empty_pool": 1}


def test_create_judge() -> None:
    old = {0: Decoded("write", WriteId(1, 0, 4)), 1: ZERO}
    assert judge_create(1, {"ok": False, "error": "CorruptionError: bad signature",
                            "not_a_pool": True}).stats == {"no_pool": 1}
    half = judge_create(1, {"ok": False, "error": "CorruptionError: PBA 7 mapped twice",
                            "not_a_pool": False})
    assert half.counts() == {"unrecoverable": 1} and "mapped twice" in half.violations[0].detail
    write = {"kind": "write", "write_id": [1, 0, 4]}
    assert judge_create(1, {"ok": True, "blocks": {"0": write, "1": {"kind": "zero"}}},
                        old).stats == {"old_pool": 1}
    assert judge_create(1, {"ok": True, "blocks": {"0": {"kind": "zero"},
                                                   "1": {"kind": "zero"}}}, old).ok
    data = judge_create(1, {"ok": True, "blocks": {"0": {"kind": "zero"}, "1": write,
                                                   "2": {"kind": "torn", "digest": "ab"}}}, old)
    assert data.counts() == {"phantom": 1, "torn": 1}
    mixed = judge_create(1, {"ok": True, "blocks": {"0": {"kind": "zero"}, "1": {"kind": "zero"},
                                                    "2": write}}, {**old, 2: old[0]})
    assert mixed.counts() == {"phantom": 1} and "half-made" in mixed.violations[0].detail
