"""testbed.clients: how fio and ext4 rounds are judged from their events and recovery, and the
scenario key that selects a client. (The real fio, ext4 and btt8-blk run in tests/vm.)"""

from __future__ import annotations

from typing import Any

import pytest

from testbed.clients import Ext4Client, FioClient, make_client
from testbed.scenario import ScenarioError, parse_scenario
from testbed.targets import Btt8Blk, TargetSpec, make_target

CONFIG = {"epoch": 1, "threads": 1}


def ev(ev: str, kind: str, path: str, sha: str = "", op: int = 0,
       epoch: int = 1) -> dict[str, Any]:
    e = {"ev": ev, "epoch": epoch, "thread": 0, "op": op, "kind": kind, "path": path, "t": op}
    if sha:
        e["sha256"] = sha
    return e


def recovered(files: dict[str, str], rc: int = 0, mount_error: str | None = None) -> dict:
    return {"ok": True, "blocks": {}, "files": files, "mount_error": mount_error,
            "fsck": {"rc": rc, "output": "e2fsck output"}}


def test_ext4_acked_file_must_survive_with_its_content() -> None:
    events = [ev("invoke", "write", "t0/a", "A"), ev("ok", "write", "t0/a", "A"),
              ev("invoke", "write", "t0/b", "B", op=1)]  # b in flight at the cut
    assert Ext4Client().judge(CONFIG, events, recovered({"t0/a": "A"}), {}).ok
    assert Ext4Client().judge(CONFIG, events, recovered({"t0/a": "A", "t0/b": "B"}), {}).ok
    lost = Ext4Client().judge(CONFIG, events, recovered({}), {})
    assert [v.kind for v in lost.violations] == ["fsync-lost"]
    wrong = Ext4Client().judge(CONFIG, events, recovered({"t0/a": "X"}), {})
    assert [v.kind for v in wrong.violations] == ["fsync-lost"]
    assert lost.stats["acked_writes"] == 1


def test_ext4_state_carries_across_rounds_and_replace_or_unlink_in_flight_is_either() -> None:
    client = Ext4Client()
    r1 = [ev("invoke", "write", "t0/a", "A"), ev("ok", "write", "t0/a", "A"),
          ev("invoke", "write", "t0/c", "C", op=1), ev("ok", "write", "t0/c", "C", op=1)]
    assert client.judge(CONFIG, r1, recovered({"t0/a": "A", "t0/c": "C"}), {}).ok
    r2 = [ev("invoke", "write", "t0/a", "A2", op=2, epoch=2),  # replace in flight
          ev("invoke", "unlink", "t0/c", op=3, epoch=2)]       # unlink in flight
    config2 = {"epoch": 2, "threads": 1}
    assert client.judge(config2, r2, recovered({"t0/a": "A2"}), {}).ok
    client2 = Ext4Client()
    client2.judge(CONFIG, r1, recovered({"t0/a": "A", "t0/c": "C"}), {})
    assert client2.judge(config2, r2, recovered({"t0/a": "A", "t0/c": "C"}), {}).ok
    # Untouched in round 2, so round 1's content must still be there.
    client3 = Ext4Client()
    client3.judge(CONFIG, r1, recovered({"t0/a": "A", "t0/c": "C"}), {})
    bad = client3.judge(config2, [], recovered({"t0/a": "A"}), {})
    assert [v.kind for v in bad.violations] == ["fsync-lost"]


def test_ext4_fsck_and_mount_failures_are_violations() -> None:
    dirty = Ext4Client().judge(CONFIG, [], recovered({}, rc=4), {})
    assert [v.kind for v in dirty.violations] == ["fsck"]
    unmountable = Ext4Client().judge(CONFIG, [], recovered({}, mount_error="bad superblock"), {})
    assert [v.kind for v in unmountable.violations] == ["unmountable"]
    gone = Ext4Client().judge(CONFIG, [], {"ok": False, "error": "attach: corrupt"}, {})
    assert [v.kind for v in gone.violations] == ["unrecoverable"]


def test_fio_verify_failure_and_fio_errors() -> None:
    good = {"ok": True, "blocks": {}, "verify": {"rc": 0, "error": None, "verified_ios": 900,
                                                 "bad": 0, "state_files": ["x.state"]}}
    verdict = FioClient().judge({"epoch": 1, "threads": 2}, [], good, {})
    assert verdict.ok and verdict.stats["acked_writes"] == 900
    bad = {**good, "verify": {**good["verify"], "rc": 1, "bad": 3, "output": "verify: bad"}}
    assert [v.kind for v in FioClient().judge({"epoch": 1, "threads": 2}, [], bad,
                                              {}).violations] == ["fio-verify"]
    died = [{"ev": "done", "epoch": 1, "errors": ["fio rc 1: Input/output error"]}]
    assert [v.kind for v in FioClient().judge({"epoch": 1, "threads": 2}, died, good,
                                              {}).violations] == ["worker-died"]


def test_client_selection() -> None:
    assert type(make_client(None)).__name__ == "AgentClient"
    assert isinstance(make_client("fio"), FioClient)
    target = make_target(TargetSpec("btt8-blk", 4096, client="ext4"))
    assert isinstance(target, Btt8Blk)
    assert target.path == "/dev/btt8a"
    assert target.agent_target() == {"kind": "btt8-blk", "path": "/dev/btt8a", "bsize": 4096,
                                     "client": "ext4"}
    kernel_btt = make_target(TargetSpec("kernel-btt", 4096))
    kernel_btt.device = "/dev/pmem0s"
    assert "client" not in kernel_btt.agent_target()


SCENARIO = """
name: x
seed: 1
vm: {{nvdimm: {{size_mib: 256}}}}
target: {target}
workload: {{threads: 1, lbas: 8, mix: {{write: 1}}, duration_s: 5}}
cuts: {{count: 1, restart: cold, when: {{after_s: [1, 2]}}}}
"""


def test_scenario_client_key() -> None:
    s = parse_scenario(SCENARIO.format(target="{kind: btt8-blk, bsize: 4096, client: fio}"))
    assert (s.target.kind, s.target.client) == ("btt8-blk", "fio")
    assert parse_scenario(SCENARIO.format(
        target="{kind: kernel-btt, bsize: 4096, client: ext4}")).target.client == "ext4"
    with pytest.raises(ScenarioError, match="target.client: only valid for"):
        parse_scenario(SCENARIO.format(target="{kind: btt8, bsize: 4096, client: fio}"))
    with pytest.raises(ScenarioError, match="target.client: expected one of"):
        parse_scenario(SCENARIO.format(target="{kind: btt8-blk, bsize: 4096, client: xfs}"))
    with pytest.raises(ScenarioError, match="target.bsize: btt8-blk blocks"):
        parse_scenario(SCENARIO.format(target="{kind: btt8-blk, bsize: 8192}"))
