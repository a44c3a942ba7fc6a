"""The campaign's host-side pieces that need no guest: staging the guest packages, reading the
event stream incrementally, splitting it per round, a failure before any guest boots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed import campaign
from testbed import image as image_mod
from testbed.events import Tail, save_round
from testbed.events import read as read_events
from testbed.guest_agent import stage


def test_staged_guest_packages_are_clean_and_hashed(tmp_path: Path) -> None:
    staged, digest = stage(tmp_path / "a")
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "btt8/core.py" in files and "tbagent/agent.py" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert (staged / "CONTENT_SHA256").read_text().strip() == digest
    assert stage(tmp_path / "b")[1] == digest  # same content, same hash


def test_new_events_returns_only_complete_new_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    tail = Tail(events)
    assert tail.new() == []  # the guest has not written yet
    events.write_bytes(b'{"ev":"start","epoch":1}\n{"ev":"invoke","ep')
    assert tail.new() == [{"ev": "start", "epoch": 1}]
    with open(events, "ab") as f:
        f.write(b'och":1}\n')
    assert tail.new() == [{"ev": "invoke", "epoch": 1}]
    assert tail.new() == []


def test_rounds_sharing_a_port_file_split_by_position(tmp_path: Path) -> None:
    """restart reset: one port file spans the rounds; round 1's last line was cut short and
    round 2's first line follows it directly. Each round's file holds its own bytes."""
    src = tmp_path / "port"
    round1 = b'{"ev":"start","t":1,"epoch":1}\n{"ev":"invoke","epo'
    round2 = b'{"ev":"start","t":2,"epoch":2}\n'
    src.write_bytes(round1)
    end1 = save_round(src, 0, tmp_path / "r1")
    with open(src, "ab") as f:
        f.write(round2)
    end2 = save_round(src, end1, tmp_path / "r2")
    assert (end1, end2) == (len(round1), len(round1) + len(round2))
    assert [e["epoch"] for e in read_events(tmp_path / "r1")] == [1]  # truncated line skipped
    assert [e["epoch"] for e in read_events(tmp_path / "r2")] == [2]
    assert [e["epoch"] for e in Tail(src, end1).new()] == [2]


def test_image_build_failure_is_exit_2_with_the_phase(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    def no_space(**kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_mod, "build", no_space)
    smoke = Path(__file__).resolve().parent.parent / "scenarios" / "smoke.yaml"
    assert campaign.run(smoke, tmp_path / "results") == 2
    (run,) = (tmp_path / "results").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failure"] == "image: OSError: [Errno 28] No space left on device"
