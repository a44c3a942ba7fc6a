"""`testbed up/down/ssh` names: validated once, up front, as the identifier they become, and
`down` deletes only inside the runtime folder whatever the name or the folder's contents say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed import cli, runtime

BAD_NAMES = ["..", ".", "../x", "/tmp", "a/b", "", "-rf", "a b", "a,b", "x" * 64, "é", "a\nb",
             ".hidden", "$(touch pwned)", "`id`", "a;b", "~"]


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(runtime root, data root, a precious folder next to them that nothing may touch)."""
    run, data, precious = tmp_path / "run", tmp_path / "data", tmp_path / "x"
    for d in (run, data, precious):
        d.mkdir()
    (precious / "keep").write_text("keep")
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(run))
    monkeypatch.setenv("TESTBED_DATA_DIR", str(data))
    monkeypatch.chdir(run)  # relative names resolve next to the runtime folder's contents
    return run, data, precious


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_every_command(
    name: str, roots: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, data, precious = roots
    tree = run.parent
    before = snapshot(tree)

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("the image build was reached with a bad name")

    monkeypatch.setattr(cli.image_mod, "build", no_build)
    for argv in (["down", "--", name], ["down", "--force", "--", name], ["up", f"--name={name}"],
                 ["ssh", "--", name, "--", "true"]):
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("testbed: bad guest name"), (argv, err)
    assert snapshot(tree) == before


def test_down_of_a_symlinked_state_folder_unlinks_only_the_link(
    roots: tuple[Path, Path, Path],
) -> None:
    run, _, precious = roots
    (run / "evil").symlink_to(precious, target_is_directory=True)
    assert cli.main(["down", "--force", "evil"]) == 0
    assert not (run / "evil").exists() and not (run / "evil").is_symlink()
    assert (precious / "keep").read_text() == "keep"


def test_down_all_skips_what_is_not_a_guest_folder(roots: tuple[Path, Path, Path]) -> None:
    run, _, precious = roots
    (run / "g1").mkdir()
    (run / "g1" / "state.json").write_text("{}")
    (run / "link").symlink_to(precious, target_is_directory=True)
    (run / "afile").write_text("not a guest")
    (run / ".odd").mkdir()
    assert runtime.names() == ["g1"]
    assert cli.main(["down", "--all", "--force"]) == 0
    assert not (run / "g1").exists()
    assert (run / "link").is_symlink() and (precious / "keep").exists()
    assert (run / "afile").exists() and (run / ".odd").is_dir()


def test_down_is_idempotent_and_status_lists_nothing(
    roots: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["down", "--force", "nobody"]) == 0
    assert cli.main(["down", "--force", "nobody"]) == 0
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out.strip() == "no guests"


def test_inside_is_a_proof_not_a_prefix_test(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (tmp_path / "run2").mkdir()
    assert runtime.inside(root / "g", root)
    assert not runtime.inside(tmp_path / "run2" / "g", root)  # a shared prefix is not inside
    assert not runtime.inside(root / ".." / "x", root)
    assert not runtime.inside(root, root)
    os.symlink(tmp_path, root / "up")
    assert not runtime.inside(root / "up" / "x", root)  # through a symlinked parent


def test_valid_names_map_to_folders_under_the_roots(roots: tuple[Path, Path, Path]) -> None:
    run, data, _ = roots
    assert runtime.state_dir("vm-1.a_b") == run / "vm-1.a_b"
    assert runtime.data_dir("default") == data / "default"
    with pytest.raises(runtime.BadName):
        runtime.data_dir("../x")
