"""Temp folders of campaigns whose orchestrator died are removed at the next start, and nothing
else is: a live campaign's folder stays, a foreign folder stays, symlinks are never followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from testbed import workdir


def _dead(root: Path, name: str) -> Path:
    """A folder whose owner is gone: created, then its lock released without removing it."""
    w = workdir.create(name, root)
    os.close(w._lock_fd)
    (w.path / "chain-1").mkdir()
    (w.path / "chain-1" / "nvdimm0.img").write_bytes(b"media")
    return w.path


def test_dead_campaigns_folder_goes_a_live_ones_stays(tmp_path: Path) -> None:
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from testbed import "
         "workdir; w = workdir.create('live', Path(sys.argv[1])); print(w.path, flush=True); "
         "sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_dir = Path(live.stdout.readline().strip())  # type: ignore[union-attr]
        dead = _dead(tmp_path, "dead")
        assert workdir.remove_abandoned(tmp_path) == [dead]
        assert live_dir.is_dir() and not dead.exists()
        live.send_signal(signal.SIGKILL)  # now its orchestrator dies as a SIGKILL leaves it
        live.wait(10)
        assert workdir.remove_abandoned(tmp_path) == [live_dir]
        assert not live_dir.exists()
    finally:
        live.kill()
        live.wait()


def test_foreign_folders_are_untouched(tmp_path: Path) -> None:
    no_owner = tmp_path / "testbed-run-by-hand"
    no_owner.mkdir()
    (no_owner / "keep").write_text("x")
    wrong_magic = _dead(tmp_path, "magic")
    (wrong_magic / workdir.OWNER).write_text(json.dumps({"magic": "other",
                                                          "dir": str(wrong_magic)}))
    elsewhere = _dead(tmp_path, "moved")
    moved = elsewhere.with_name(elsewhere.name + "-copy")  # an owner file naming another dir
    elsewhere.rename(moved)
    not_ours = _dead(tmp_path, "x")
    renamed = tmp_path / "other-prefix"
    not_ours.rename(renamed)
    garbage = _dead(tmp_path, "garbage")
    (garbage / workdir.OWNER).write_bytes(b"\xff\x00")
    a_file = tmp_path / "testbed-run-file"
    a_file.write_text("x")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert workdir.remove_abandoned(tmp_path) == []
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "tmp", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    # a symlink named like a run folder, pointing at a real abandoned folder elsewhere
    target = _dead(outside, "target")
    link = root / "testbed-run-link"
    link.symlink_to(target)
    # an abandoned folder holding a symlink out of it, and one whose owner file is a symlink
    dead = _dead(root, "dead")
    (dead / "escape").symlink_to(outside)
    (dead / "chain-1" / "escape-file").symlink_to(outside / "precious")
    linked_owner = root / "testbed-run-linkedowner"
    linked_owner.mkdir()
    (linked_owner / workdir.OWNER).symlink_to(target / workdir.OWNER)
    assert workdir.remove_abandoned(root) == [dead]
    assert link.is_symlink() and target.is_dir() and (target / "chain-1" / "nvdimm0.img").exists()
    assert (outside / "precious").read_text() == "keep me"
    assert (linked_owner / workdir.OWNER).is_symlink()


def test_a_campaigns_own_folder_is_removed_by_itself(tmp_path: Path) -> None:
    w = workdir.create("mine", tmp_path)
    assert workdir.remove_abandoned(tmp_path) == []  # locked by this process: live
    w.remove()
    assert list(tmp_path.iterdir()) == []
