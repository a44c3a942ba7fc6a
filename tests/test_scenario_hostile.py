"""The scenario loader on hostile input: any bytes, any YAML, any number. Each bad input is one
line `file:line: key: message` (a ScenarioError; exit 2 from the CLI) and nothing is created."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from testbed import cli
from testbed.scenario import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    HostLimits,
    ScenarioError,
    load_scenario,
    parse_scenario,
)

VALID = """\
name: t
seed: 3
vm: {memory_mib: 512, smp: 2, nvdimm: {size_mib: 64, label_kib: 128}}
target: {kind: btt8, bsize: 4096}
workload: {threads: 2, lbas: 16, mix: {read: 1, write: 1}, duration_s: 5}
cuts: {count: 2, when: {after_s: [1.0, 2.0]}}
timeouts: {boot_s: 300, workload_s: 60, recover_s: 60}
"""
LIMITS = HostLimits(cores=2, memory_mib=4096, disk_free_mib=8192)
LINE = re.compile(r"^x\.yaml:\d+: [^\n:]+: [^\n]+$")


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "x.yaml", LIMITS)
    message = str(info.value)
    assert LINE.match(message), message
    return message


def test_the_base_document_is_valid() -> None:
    assert parse_scenario(VALID, "x.yaml", LIMITS).cuts.count == 2


# --- numbers: finite, bounded --------------------------------------------------------------

NUMBER_FIELDS = [  # (text to replace, key path in the message)
    ("memory_mib: 512", "vm.memory_mib"),
    ("smp: 2", "vm.smp"),
    ("size_mib: 64", "vm.nvdimm.size_mib"),
    ("label_kib: 128", "vm.nvdimm.label_kib"),
    ("bsize: 4096", "target.bsize"),
    ("threads: 2", "workload.threads"),
    ("lbas: 16", "workload.lbas"),
    ("read: 1", "workload.mix.read"),
    ("write: 1", "workload.mix.write"),
    ("duration_s: 5", "workload.duration_s"),
    ("count: 2", "cuts.count"),
    ("[1.0, 2.0]", "cuts.when.after_s"),
    ("boot_s: 300", "timeouts.boot_s"),
    ("workload_s: 60", "timeouts.workload_s"),
    ("recover_s: 60", "timeouts.recover_s"),
    ("seed: 3", "seed"),
]


@pytest.mark.parametrize("bad", [".nan", ".NaN", ".inf", "-.inf", "+.inf", "1e400", "-1e400",
                                 "10" + "0" * 30, "1" * 5000, "-5", "true", "~", "0x" + "f" * 40])
@pytest.mark.parametrize(("old", "key"), NUMBER_FIELDS, ids=[k for _, k in NUMBER_FIELDS])
def test_every_number_is_finite_and_bounded(old: str, key: str, bad: str) -> None:
    if old.startswith("["):
        new = f"[{bad}, {bad}]"
    else:
        new = old.split(":")[0] + f": {bad}"
    assert old in VALID
    message = error_of(VALID.replace(old, new, 1))
    assert f": {key}: " in message


def test_mix_of_huge_finite_weights_cannot_overflow() -> None:
    assert "workload.mix.read" in error_of(VALID.replace("read: 1", "read: 1e308"))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("count: 2", "count: 1000000000", "cuts.count"),
        ("size_mib: 64", "size_mib: 10485760", "vm.nvdimm.size_mib"),  # 10 TiB
        ("threads: 2", "threads: 100000", "workload.threads"),
        ("smp: 2", "smp: 10000", "vm.smp"),
        ("smp: 2", "smp: 3", "vm.smp"),  # more than this (2-core) host
        ("memory_mib: 512", "memory_mib: 8192", "vm.memory_mib"),  # more than this host
        ("duration_s: 5", "duration_s: 1e9", "workload.duration_s"),
        ("boot_s: 300", "boot_s: 1e12", "timeouts.boot_s"),
        ("lbas: 16", "lbas: 100000000", "workload.lbas"),
        ("bsize: 4096", "bsize: 1073741824", "target.bsize"),
    ],
)
def test_sane_upper_bounds(old: str, new: str, key: str) -> None:
    assert f": {key}: " in error_of(VALID.replace(old, new, 1))


def test_disk_bound_follows_the_host() -> None:
    small = HostLimits(cores=2, memory_mib=4096, disk_free_mib=100)
    with pytest.raises(ScenarioError, match="vm.nvdimm.size_mib: .*free disk"):
        parse_scenario(VALID, "x.yaml", small)
    assert HostLimits.probe().cores >= 1


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc", ".", "..", "'a b'", "'a,b'", "'$(reboot)'",
                                  "'`id`'", "'-rf'", "x" * 64, "'a;b'", '"a\\nb"', "é", "'~'",
                                  "123", "true", "null"])
def test_name_must_be_the_machine_name_it_becomes(name: str) -> None:
    assert error_of(VALID.replace("name: t", f"name: {name}")).startswith("x.yaml:1: name: ")


# --- YAML that is not plain data -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch /tmp/pwned']\n",
        VALID.replace("name: t", "name: !!python/object/apply:os.system ['touch pwned']"),
        VALID.replace("name: t", "name: !!python/name:os.system"),
        VALID.replace("seed: 3", "seed: !!python/int 3"),
        VALID.replace("name: t", "name: !!binary aGVsbG8="),
        VALID.replace("name: t", "name: !custom t"),
        VALID.replace("seed: 3", "seed: !!int abc"),
        VALID.replace("seed: 3", "seed: !!float abc"),
        VALID.replace("name: t", "name: 2024-13-45"),  # a timestamp that is no date
        VALID.replace("name: t", "name: 2024-06-01"),
        VALID.replace("name: t", "name: !!set {a, b}"),
        VALID.replace("vm: {", "vm: !!omap {"),
        VALID.replace("vm: {", "vm: !!python/dict {"),
        VALID.replace("cuts: {count: 2, when: {after_s: [1.0, 2.0]}}",
                      "cuts: {count: 2, when: {after_s: !!python/tuple [1.0, 2.0]}}"),
        "? [a, b]\n: 1\n",
        "{[1, 2]: 3}\n",
        "? {a: 1}\n: 1\n",
        VALID.replace("seed: 3", "? [seed]\n: 3"),
        VALID.replace("seed: 3", "!!python/str seed: 3"),
        VALID.replace("seed: 3", "1: 3"),
        VALID.replace("seed: 3", "null: 3"),
        "[" * 100000 + "]" * 100000 + "\n",
        "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300)),
        "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        "- " * 3000 + "1\n",
        "&a [*a]\n",
        "a: *nope\n",
        "--- 1\n--- 2\n",
        "",
        "# only a comment\n",
        "just a string\n",
        "- a list\n",
        "name: \x00\n",
        "name: t\x07\n",
        "\t\tname: [\n",
        "%YAML 9.9\n--- {}\n",
        "%TAG !e! tag:example.com,2000:\n--- !e!x {}\n",
        "a: &x 1\nb: *x\n" + "c: [" + ", ".join(["*x"] * 1000) + "]\n",
        VALID + "name: again\n",
        VALID.replace("name: t", "name: " + "a" * 100000),
        VALID.replace("target: {kind: btt8, bsize: 4096}",
                      "target: {kind: btt8, bsize: 4096, namespace: [devdax]}"),
    ],
)
def test_non_data_yaml_is_one_located_error(text: str) -> None:
    error_of(text)


def test_deep_nesting_is_refused_before_the_composer(tmp_path: Path) -> None:
    ok_depth = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert "unknown key" in error_of(ok_depth)
    assert "nested deeper" in error_of("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


# --- files that are not text --------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, LIMITS)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    return message


def test_binary_utf16_and_oversized_files(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    assert "not UTF-8" in load_error(tmp_path / "bin.yaml")
    (tmp_path / "u16.yaml").write_bytes(VALID.encode("utf-16"))
    assert "not UTF-8" in load_error(tmp_path / "u16.yaml")
    (tmp_path / "u16be.yaml").write_bytes(VALID.encode("utf-16-be"))
    load_error(tmp_path / "u16be.yaml")
    (tmp_path / "late.yaml").write_bytes(VALID.encode() + b"# \xff\n")
    assert load_error(tmp_path / "late.yaml").startswith(f"{tmp_path / 'late.yaml'}:8: ")
    (tmp_path / "nul.yaml").write_bytes(VALID.encode() + b"\x00\n")
    load_error(tmp_path / "nul.yaml")
    (tmp_path / "big.yaml").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    assert "larger than" in load_error(tmp_path / "big.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert load_scenario(tmp_path / "bom.yaml", LIMITS).name == "t"


def test_fifo_device_directory_and_missing_file_do_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(load_error(fifo)), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "loading a FIFO hung"
    assert "not a regular file" in outcome[0]
    assert "not a regular file" in load_error(Path("/dev/zero"))
    assert "not a regular file" in load_error(tmp_path)
    assert "cannot read" in load_error(tmp_path / "nope.yaml")
    link = tmp_path / "link.yaml"
    link.symlink_to("/dev/zero")
    assert "not a regular file" in load_error(link)


def test_cli_run_of_a_bad_scenario_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("name: t", "name: ../../escape"))
    results = tmp_path / "results"
    capsys.readouterr()
    assert cli.main(["run", str(bad), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"testbed: {bad}:1: name: expected a name of 1-63 letters, digits, '_', '.' "
                   "or '-' starting with a letter or digit, got '../../escape'"]
    assert not results.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
