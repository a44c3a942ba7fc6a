"""Property tests that try to break the scenario loader: hypothesis-generated documents (random
structure, types, YAML tags, NaN/inf/huge numbers, strings full of shell and path
metacharacters in every string field, raw bytes). Whatever the document: a valid Scenario or
one ScenarioError line `file:line: key: message` (and exit 2 from `testbed run`, with no run
folder); never another exception, never a command run, never a file written outside the test's
own folder."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed import cli
from testbed.qemu_cmdline import NAME_RE
from testbed.scenario import (
    MAX_SECONDS,
    MAX_WEIGHT,
    HostLimits,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
)

REPO = Path(__file__).resolve().parent.parent
BASE_TEXT = (REPO / "scenarios" / "smoke.yaml").read_text()
BASE: dict[str, Any] = yaml.safe_load(BASE_TEXT)
LIMITS = HostLimits(cores=2, memory_mib=4096, disk_free_mib=8192)
MARK = f"tb-pwned-{os.getpid()}"
LINE = re.compile(r"^[^\n]+:\d+: [^\n]+: [^\n]+$")
COUNTS: dict[str, int] = {}

METACHARS = [";", "|", "&", "$(", ")", "`", "'", '"', "\\", "\n", "\r", "\t", "\x00", "\x1b",
             "..", "/", "~", "*", "?", "[", "]", "{", "}", "<", ">", "#", ",", "=", " ", "-",
             "!", "%", "@", "\u202e", "é", "\ud7ff", "${IFS}", "../../", "/etc/passwd",
             f"$(touch {MARK})", f"; touch {MARK} #", f"`touch {MARK}`", f"../{MARK}",
             f"/tmp/{MARK}", "-rf", "--help", "%n", "{0}", "\\u0000"]


class Raw(str):
    """A YAML fragment emitted verbatim (tags, special scalars, anchors)."""


RAW_SCALARS = [
    ".nan", ".NaN", "-.inf", ".inf", "+.Inf", "1e400", "-1e400", "1" * 400, "0x" + "f" * 30,
    "0o777", "0b1010", "1_000", "~", "null", "yes", "off", "2024-06-01", "2024-13-45 25:61",
    "!!python/object/apply:os.system [\"touch " + MARK + "\"]",
    "!!python/object/new:os.system [\"touch " + MARK + "\"]",
    "!!python/name:os.system", "!!python/module:os", "!!binary aGVsbG8=", "!!timestamp 2001-12-14",
    "!custom {a: 1}", "!!set {a, b}", "!!omap [a: 1]", "!!str 3", "!!int 0x10", "!!float 1",
    "!!int '1e3'", "!!bool maybe", "!!null x", "&anchor 5", "*undefined",
    "!<tag:yaml.org,2002:python/object/apply:os.system> [\"touch " + MARK + "\"]",
]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, 1, -1, 16, 512, 4096, 2**31, 2**63, 2**64, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.sampled_from(METACHARS + list("abc019_.-")), max_size=8).map("".join),
    st.text(max_size=12),
    st.sampled_from(RAW_SCALARS).map(Raw),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(
            ["name", "seed", "vm", "target", "kind", "count", "when", "after_s", "mix"])),
            inner, max_size=4),
    ),
    max_leaves=12,
)


def emit(value: Any) -> str:
    """Flow-style YAML for `value`; Raw fragments verbatim; strings double-quoted."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(emit(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{emit(k)}: {emit(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def string_paths(obj: Any) -> list[tuple[Any, ...]]:
    return [p for p in paths(obj) if p and isinstance(_get(obj, p), str)]


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@st.composite
def mutated_documents(draw: Any) -> str:
    """The shipped smoke scenario with 1-4 random edits: a value replaced by any value (any
    type, tag or special number), a key added or deleted; or a wholly random document."""
    if draw(st.integers(0, 9)) == 0:
        return emit(draw(values))
    doc = _copy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(paths(doc)))
        op = draw(st.sampled_from(["set", "set", "set", "add", "delete"]))
        if op == "set":
            if not where:
                doc = draw(values)
                break
            parent = _get(doc, where[:-1])
            parent[where[-1]] = draw(values)
        elif op == "add":
            target = _get(doc, where)
            if isinstance(target, dict):
                target[draw(st.text(max_size=6))] = draw(values)
        elif where:
            parent = _get(doc, where[:-1])
            if isinstance(parent, dict):
                del parent[where[-1]]
    return emit(doc)


@st.composite
def metachar_documents(draw: Any) -> tuple[str, tuple[Any, ...]]:
    """The shipped scenario with ONE string field (each of them, in turn) full of shell and
    path metacharacters."""
    doc = _copy(BASE)
    where = draw(st.sampled_from(string_paths(doc)))
    text = draw(st.lists(st.sampled_from(METACHARS + list("ab0_.-")), min_size=1, max_size=10)
                .map("".join))
    parent = _get(doc, where[:-1])
    parent[where[-1]] = text
    return emit(doc), where


@contextmanager
def no_commands() -> Iterator[list[str]]:
    """Every way of running a program raises (and is recorded): the loader must need none."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            calls.append(f"{name}{a!r:.80}")
            raise AssertionError(f"{name} called while loading a scenario")
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
        for fn in ("system", "popen", "execv", "execve", "execvp", "execvpe", "spawnv",
                   "spawnve", "posix_spawn", "posix_spawnp", "fork"):
            if hasattr(os, fn):
                mp.setattr(os, fn, refuse(f"os.{fn}"))
        yield calls


def check(text: str, workdir: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """The loader's contract on one document, through the API and through `testbed run`."""
    path = workdir / "s.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = sorted(p.name for p in workdir.iterdir())
    with no_commands() as calls:
        try:
            scenario: Scenario | None = load_scenario(path, LIMITS)
        except ScenarioError as e:
            scenario = None
            message = str(e)
            assert LINE.match(message) and message.startswith(f"{path}:"), message
        if scenario is None:
            capsys.readouterr()
            code = cli.main(["run", str(path), "--results", str(workdir / "results")])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith("testbed: "), err
    assert not calls, calls
    assert sorted(p.name for p in workdir.iterdir()) == before  # no run folder, nothing else
    COUNTS[f"{kind} {'accepted' if scenario else 'rejected'}"] = (
        COUNTS.get(f"{kind} {'accepted' if scenario else 'rejected'}", 0) + 1)
    if scenario is not None:
        assert_sane(scenario)


def assert_sane(s: Scenario) -> None:
    """What an accepted scenario may hold: machine names, finite bounded numbers."""
    assert NAME_RE.fullmatch(s.name)
    assert 1 <= s.cuts.count <= 10_000 and 1 <= s.workload.threads <= 256
    assert 1 <= s.vm.smp <= LIMITS.smp and s.vm.memory_mib <= LIMITS.memory_mib
    assert s.vm.nvdimm.size_mib <= LIMITS.nvdimm_mib
    weights = [s.workload.mix.read, s.workload.mix.write, s.workload.mix.zero]
    seconds = [s.timeouts.boot_s, s.timeouts.workload_s, s.timeouts.recover_s,
               *(s.cuts.when.after_s or ()),
               *([s.workload.duration_s] if s.workload.duration_s is not None else [])]
    # (weights have their own bound: a mix weight of 86,401 is no duration)
    assert all(math.isfinite(x) and 0 <= x <= MAX_WEIGHT for x in weights), weights
    assert all(math.isfinite(x) and 0 <= x <= MAX_SECONDS for x in seconds), seconds
    assert sum((s.workload.mix.read, s.workload.mix.write, s.workload.mix.zero)) > 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenario-props")


SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(text=mutated_documents())
def test_generated_documents_load_or_fail_in_one_line(
    text: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check(text, workdir, capsys, "mutated")


@SETTINGS
@given(doc=metachar_documents())
def test_metacharacters_in_every_string_field(
    doc: tuple[str, tuple[Any, ...]], workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, where = doc
    check(text, workdir, capsys, "metachar " + ".".join(map(str, where)))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=200).map(lambda b: BASE_TEXT.encode() + b),
                      st.text(max_size=100).map(lambda t: t.encode("utf-16"))))
def test_arbitrary_bytes(data: bytes, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "b.yaml"
    path.write_bytes(data)
    with no_commands() as calls:
        try:
            load_scenario(path, LIMITS)
            COUNTS["bytes accepted"] = COUNTS.get("bytes accepted", 0) + 1
        except ScenarioError as e:
            assert LINE.match(str(e)), str(e)
            COUNTS["bytes rejected"] = COUNTS.get("bytes rejected", 0) + 1
    assert not calls


def test_every_string_field_was_exercised_and_nothing_escaped(workdir: Path) -> None:
    """Runs after the properties above (file order): each string field got metacharacters,
    and no marker file exists anywhere a shell or a path could have put it."""
    fields = {".".join(map(str, p)) for p in string_paths(BASE)}
    if any(k.startswith("metachar ") for k in COUNTS):  # not when run alone with -k
        seen = {k.split(" ")[1] for k in COUNTS if k.startswith("metachar ")}
        assert fields <= seen, (fields - seen, COUNTS)
    for where in (Path("/tmp"), workdir, workdir.parent, Path.cwd(), REPO):
        assert not list(where.glob(f"*{MARK}*")), where
    assert not (REPO / "results" / MARK).exists()


def test_a_valid_scenario_still_loads() -> None:
    assert parse_scenario(BASE_TEXT, "smoke.yaml", LIMITS).name == BASE["name"]
