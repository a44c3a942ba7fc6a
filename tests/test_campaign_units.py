"""The campaign's host-side pieces that need no guest: staging the guest packages, reading the
event stream incrementally, splitting it per round."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from testbed.campaign import _new_events, _save_events, _stage_guest_packages


def test_staged_guest_packages_are_clean_and_hashed(tmp_path: Path) -> None:
    staged, digest = _stage_guest_packages(tmp_path / "a")
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "btt8/core.py" in files and "tbagent/agent.py" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert (staged / "CONTENT_SHA256").read_text().strip() == digest
    assert _stage_guest_packages(tmp_path / "b")[1] == digest  # same content, same hash


def test_new_events_returns_only_complete_new_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    boot = SimpleNamespace(events=events, events_read=0)
    assert _new_events(boot) == []  # the guest has not written yet
    events.write_bytes(b'{"ev":"start","epoch":1}\n{"ev":"invoke","ep')
    assert _new_events(boot) == [{"ev": "start", "epoch": 1}]
    with open(events, "ab") as f:
        f.write(b'och":1}\n')
    assert _new_events(boot) == [{"ev": "invoke", "epoch": 1}]
    assert _new_events(boot) == []


def test_saved_events_keep_one_round_and_truncated_lines(tmp_path: Path) -> None:
    src = tmp_path / "all.jsonl"
    lines = [json.dumps({"ev": "ok", "epoch": e, "op": i}) for e, i in ((1, 0), (2, 0), (2, 1))]
    src.write_text("\n".join(lines) + '\n{"ev":"invoke","epo')
    _save_events(src, 2, tmp_path / "round2.jsonl")
    kept = (tmp_path / "round2.jsonl").read_text().splitlines()
    assert kept == [lines[1], lines[2], '{"ev":"invoke","epo']
