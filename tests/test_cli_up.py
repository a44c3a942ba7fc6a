"""`testbed up` options that are settled before anything boots."""

from __future__ import annotations

import pytest

from testbed import cli


def test_up_gives_an_nvdimm_unless_told_not_to() -> None:
    assert cli.DEFAULT_NVDIMM == (256 << 20, "devdax")
    parser = cli.argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli._add_up(sub)
    args = parser.parse_args(["up"])
    assert (args.nvdimm, args.no_nvdimm, args.attach) == ([], False, None)
    assert parser.parse_args(["up", "--attach", "btt8"]).attach == "btt8"


def test_no_nvdimm_with_attach_is_refused_before_booting(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["up", "--name", "nonvdimm", "--no-nvdimm", "--attach", "btt8"]) == 2
    assert "--no-nvdimm leaves nothing" in capsys.readouterr().err
