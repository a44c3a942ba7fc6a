"""The guest agent on the host: raw-pmem style on a regular file, btt8 on a file pool, and a
SIGKILL mid-workload that the oracle must judge clean (a process kill loses nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tbagent import agent
from tbagent.payload import ZERO, Decoded, WriteId, make_block

from testbed.events import read as read_events
from testbed.oracle import initial_state, judge, next_resume

SEED = 99
MIX = {"read": 2.0, "write": 3.0, "zero": 1.0}
BSIZE = 4096


def run_agent(command: str, config: dict[str, Any]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tbagent", command],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        timeout=120,
    )


def agent_json(command: str, config: dict[str, Any]) -> dict[str, Any]:
    done = run_agent(command, config)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def kill_workload_mid_flight(config: dict[str, Any], events_path: Path,
                             lines: int = 400) -> None:
    """Run `tbagent workload` with `config` and SIGKILL it once it has written `lines` events
    (a power cut, as far as a process can have one)."""
    proc = subprocess.Popen([sys.executable, "-m", "tbagent", "workload"],
                            stdin=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config))
    proc.stdin.close()
    deadline = time.monotonic() + 60
    while not events_path.exists() or events_path.read_bytes().count(b"\n") < lines:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def raw_target(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "pmem0"
    path.write_bytes(b"\xa5" * (32 * BSIZE))  # garbage that prepare must clear
    return {"kind": "raw-pmem", "path": str(path), "bsize": BSIZE}


@pytest.fixture
def btt8_target(tmp_path: Path) -> dict[str, Any]:
    return {"kind": "btt8", "path": str(tmp_path / "pool"), "bsize": BSIZE, "pool_mib": 32}


def workload_config(target: dict[str, Any], events: Path, **overrides: Any) -> dict[str, Any]:
    config = {
        "target": target,
        "seed": SEED,
        "epoch": 0,
        "threads": 3,
        "lbas": 8,
        "mix": MIX,
        "ops": 60,
        "resume": [0, 0, 0],
        "events": str(events),
    }
    return {**config, **overrides}


def test_prepare_zeroes_the_working_set(raw_target: dict[str, Any]) -> None:
    assert agent.prepare({"target": raw_target, "lbas": 16}) == {"ok": True, "nblock": 32}
    dump = agent.recover_and_dump({"target": raw_target, "seed": SEED, "lbas": 16})
    assert dump["ok"] and set(dump["blocks"]) == {str(i) for i in range(16)}
    assert all(v == {"kind": "zero"} for v in dump["blocks"].values())


def test_prepare_refuses_a_working_set_larger_than_the_target(raw_target: dict[str, Any]) -> None:
    with pytest.raises(agent.ConfigError, match="exceeds"):
        agent.prepare({"target": raw_target, "lbas": 33})


def test_workload_events_and_recovered_state(raw_target: dict[str, Any], tmp_path: Path) -> None:
    agent.prepare({"target": raw_target, "lbas": 8})
    events_path = tmp_path / "events.jsonl"
    config = workload_config(raw_target, events_path, resume=[0, 100, 7])
    assert agent_json("workload", config) == {"ok": True, "errors": []}
    events = read_events(events_path)
    assert events[0]["ev"] == "start" and events[-1]["ev"] == "done"
    for line in events_path.read_bytes().splitlines():
        assert len(line) + 1 < 4096  # one atomic write per line on a pipe-like channel
    ops = [e for e in events if e["ev"] in ("invoke", "ok")]
    assert len(ops) == 2 * 3 * 60
    for thread, first in enumerate([0, 100, 7]):
        mine = [e for e in ops if e["thread"] == thread]
        # invoke then ok, op by op, resumed at the offset, timestamps non-decreasing
        assert [(e["ev"], e["op"]) for e in mine] == [
            (ev, i) for i in range(first, first + 60) for ev in ("invoke", "ok")
        ]
        assert [e["t"] for e in mine] == sorted(e["t"] for e in mine)
        assert all("value" in e for e in mine if e["ev"] == "ok" and e["kind"] == "read")
    dump = agent_json("recover-and-dump", {"target": raw_target, "seed": SEED, "lbas": 8})
    assert dump["ok"]
    assert judge(config, events, dump).ok


def test_single_thread_reads_see_the_last_write(raw_target: dict[str, Any], tmp_path: Path) -> None:
    agent.prepare({"target": raw_target, "lbas": 4})
    config = workload_config(raw_target, tmp_path / "ev", threads=1, lbas=4, resume=None, ops=200)
    agent.workload(config)
    state = dict.fromkeys(range(4), ZERO)
    for e in read_events(tmp_path / "ev"):
        if e["ev"] != "ok":
            continue
        if e["kind"] == "read":
            assert Decoded.from_json(e["value"]) == state[e["lba"]]
        elif e["kind"] == "write":
            state[e["lba"]] = Decoded("write", WriteId(0, 0, e["op"]))
        else:
            state[e["lba"]] = ZERO
    dump = agent.recover_and_dump({"target": raw_target, "seed": SEED, "lbas": 4})
    assert {int(k): Decoded.from_json(v) for k, v in dump["blocks"].items()} == state


def test_recover_and_dump_reports_torn_and_phantom_blocks(raw_target: dict[str, Any]) -> None:
    agent.prepare({"target": raw_target, "lbas": 4})
    fd = os.open(raw_target["path"], os.O_WRONLY)
    try:
        good = make_block(SEED, 1, WriteId(0, 0, 5), BSIZE)
        os.pwrite(fd, good[:512] + make_block(SEED, 1, WriteId(0, 0, 6), BSIZE)[512:], BSIZE)
        os.pwrite(fd, good, 2 * BSIZE)  # lba 1's block found at lba 2
    finally:
        os.close(fd)
    blocks = agent.recover_and_dump({"target": raw_target, "seed": SEED, "lbas": 4})["blocks"]
    assert blocks["1"]["kind"] == "torn"
    assert blocks["2"] == {"kind": "phantom", "write_id": [0, 0, 5], "lba": 1}


def test_unusable_config_exits_2(raw_target: dict[str, Any]) -> None:
    assert run_agent("workload", {"target": raw_target}).returncode == 2
    assert run_agent("frobnicate", {}).returncode == 2
    bad = workload_config(raw_target, Path("/dev/null"), ops=None)
    assert run_agent("workload", bad).returncode == 2


def test_btt8_pool_file_end_to_end(btt8_target: dict[str, Any], tmp_path: Path) -> None:
    prepared = agent_json("prepare", {"target": btt8_target, "lbas": 8})
    assert prepared["ok"] and prepared["nblock"] >= 8
    config = workload_config(btt8_target, tmp_path / "ev")
    assert agent_json("workload", config)["ok"]
    dump = agent_json("recover-and-dump", {"target": btt8_target, "seed": SEED, "lbas": 8})
    assert dump["ok"] and dump["checked"] is True  # btt8's read-only consistency check ran
    assert judge(config, read_events(tmp_path / "ev"), dump).ok
    # prepare again starts over: the old pool file is replaced by a zeroed one
    agent_json("prepare", {"target": btt8_target, "lbas": 8})
    dump = agent_json("recover-and-dump", {"target": btt8_target, "seed": SEED, "lbas": 8})
    assert all(v == {"kind": "zero"} for v in dump["blocks"].values())


def test_unopenable_btt8_pool_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    path.write_bytes(b"\x00" * (16 << 20))  # no superblock
    target = {"kind": "btt8", "path": str(path), "bsize": BSIZE}
    dump = agent_json("recover-and-dump", {"target": target, "seed": SEED, "lbas": 4})
    assert dump["ok"] is False and dump["error"]


@pytest.mark.parametrize("kind", ["raw-pmem", "btt8"])
def test_sigkill_mid_workload_then_recover_is_judged_clean(
    kind: str, raw_target: dict[str, Any], btt8_target: dict[str, Any], tmp_path: Path
) -> None:
    """Two rounds, each killed mid-flight; the second resumes and starts from the first's
    recovered state, as the orchestrator will run cuts."""
    target = raw_target if kind == "raw-pmem" else btt8_target
    agent_json("prepare", {"target": target, "lbas": 8})
    initial = None
    resume = [0, 0, 0]
    for epoch in range(2):
        events_path = tmp_path / f"events-{epoch}.jsonl"
        config = workload_config(
            target, events_path, epoch=epoch, ops=None, duration_s=60, resume=resume
        )
        kill_workload_mid_flight(config, events_path)
        events = read_events(events_path)
        assert not any(e["ev"] == "done" for e in events)
        dump = agent_json("recover-and-dump", {"target": target, "seed": SEED, "lbas": 8})
        verdict = judge(config, events, dump, initial)
        assert verdict.ok, verdict.to_json()
        assert verdict.stats["acked_writes"] > 0
        initial = initial_state(dump)
        resume = next_resume(events, resume)


def test_rolled_back_acked_write_on_a_real_history_is_lost_ack(
    raw_target: dict[str, Any], tmp_path: Path
) -> None:
    agent.prepare({"target": raw_target, "lbas": 4})
    config = workload_config(raw_target, tmp_path / "ev", threads=1, lbas=4, resume=None)
    agent.workload(config)
    events = read_events(tmp_path / "ev")
    last = {e["lba"]: e for e in events if e["ev"] == "ok" and e["kind"] != "read"}
    lba, acked = next((lba, e) for lba, e in last.items() if e["kind"] == "write")
    fd = os.open(raw_target["path"], os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(BSIZE), lba * BSIZE)  # the device "forgets" the last acked write
    finally:
        os.close(fd)
    dump = agent.recover_and_dump({"target": raw_target, "seed": SEED, "lbas": 4})
    verdict = judge(config, events, dump)
    assert [(v.kind, v.lba) for v in verdict.violations] == [("lost-ack", lba)]
    assert verdict.violations[0].contradicts.op == acked["op"]


def test_event_lines_survive_short_and_empty_writes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtio-serial port with a full queue takes part of a line, or nothing: every line
    still arrives whole and in order (a lost invoke line left an orphan ok)."""
    from tbagent import agent as agent_mod

    real_write = os.write
    takes = iter([0, 5, 0, 3])

    def stingy(fd: int, data: bytes) -> int:
        n = next(takes, None)
        return real_write(fd, bytes(data[:n])) if n is not None else real_write(fd, data)

    monkeypatch.setattr(agent_mod.os, "write", stingy)
    log = agent_mod.EventLog(str(tmp_path / "ev"))
    for i in range(3):
        log.emit({"ev": "invoke", "op": i})
    log.close()
    assert [e["op"] for e in read_events(tmp_path / "ev")] == [0, 1, 2]
