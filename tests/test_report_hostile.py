"""`testbed report` on damaged and hostile run folders: what is missing or corrupt is reported
(exit 2, a JUnit error, a visible note in report.html), never rendered around; every value in the
page is escaped, including what the guest wrote; nothing is written outside the run folder."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_results import record_three_cuts, synthetic_cut

from testbed import cli
from testbed.report import load_run, publish
from testbed.results import EVENTS, RunResults
from testbed.scenario import load_scenario

SMOKE = Path(__file__).parent.parent / "scenarios" / "smoke.yaml"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished three-cut run folder (cut 2 a lost-ack) to copy and damage."""
    tmp = tmp_path_factory.mktemp("pristine")
    run = RunResults.create(tmp / "results", load_scenario(SMOKE), SMOKE, {"accel": "tcg"},
                            run_id="r1")
    record_three_cuts(run, tmp)
    run.finish()
    assert publish(run.run_dir) == []
    return run.run_dir


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "box" / "r1"
    shutil.copytree(pristine, dst)
    return dst


def report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["report", str(run_dir)])
    return code, capsys.readouterr().err.strip().splitlines()


def junit_errors(run_dir: Path) -> list[ET.Element]:
    return ET.parse(run_dir / "junit.xml").getroot().findall("testcase/error")


def test_a_sound_folder_reports_clean(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report(run_dir, capsys) == (0, [])
    assert junit_errors(run_dir) == []
    assert 'class="damaged"' not in (run_dir / "report.html").read_text()


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'{"status": "passed"}',
                                     b'{"status": "won", "cuts": 3, "violations": {}}',
                                     b'{"status": "passed", "cuts": 3, "violations": {},'
                                     b' "elapsed_s": NaN}',
                                     b"\xff\xfe\x00\x00"])
def test_invalid_summary_is_exit_2_a_junit_error_and_a_note(
    run_dir: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (run_dir / "summary.json").write_bytes(content)
    code, err = report(run_dir, capsys)
    assert code == 2
    assert len(err) == 1 and "summary.json" in err[0] and "damaged" in err[0]
    errors = junit_errors(run_dir)
    assert errors and any("summary.json" in (e.get("message") or "") for e in errors)
    page = (run_dir / "report.html").read_text()
    assert 'class="damaged"' in page and "summary.json" in page


def test_truncated_verdict_of_a_violating_cut_is_not_dropped(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verdict = run_dir / "cut-2" / "verdict.json"
    verdict.write_bytes(verdict.read_bytes()[:100])
    code, err = report(run_dir, capsys)
    assert code == 2 and "cut-2/verdict.json" in err[0] and "truncated" in err[0]
    suite = ET.parse(run_dir / "junit.xml").getroot()
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["cut-2"].find("error") is not None
    assert suite.get("errors") == "1"
    page = (run_dir / "report.html").read_text()
    assert "no verdict" in page and "cut-2/verdict.json" in page


def test_deleted_verdict_and_missing_cut_folder(run_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "cut-2" / "verdict.json").unlink()
    shutil.rmtree(run_dir / "cut-3")
    code, err = report(run_dir, capsys)
    assert code == 2
    problems = load_run(run_dir).problems
    assert any("cut-2/verdict.json: missing" in p for p in problems)
    assert any("cut-3" in p and "folder is missing" in p for p in problems)


def test_a_summary_that_hides_a_violation_is_reported(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(violations={}, status="passed", exit_code=0, cuts_with_violations=0)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    code, err = report(run_dir, capsys)
    assert code == 2 and "verdicts add up to" in err[0] and "lost-ack" in err[0]


def test_a_verdict_that_contradicts_itself_is_reported(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_dir / "cut-2" / "verdict.json"
    verdict = json.loads(path.read_text())
    verdict["ok"] = True
    path.write_text(json.dumps(verdict))
    assert report(run_dir, capsys)[0] == 2
    assert any("disagree" in p for p in load_run(run_dir).problems)


def test_an_interrupted_cut_without_verdict_is_not_a_problem(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "cut-4").mkdir()
    (run_dir / "cut-4" / "console.log").write_text("booting\n")
    assert report(run_dir, capsys) == (0, [])


def test_guest_written_values_are_escaped(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The guest controls the event stream: kinds, error strings and read values are its
    words. None of them may reach the page as markup."""
    run = RunResults.create(tmp_path / "results", load_scenario(SMOKE), SMOKE,
                            {"accel": EVIL, "seed": EVIL}, run_id="r1")
    verdict = synthetic_cut(run.cut_dir(1), 0, lose_ack=True)
    events_path = run.cut_dir(1) / EVENTS
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    for e in events:
        if e["ev"] == "ok" and e["kind"] == "read":
            e["value"] = {"kind": EVIL, "write_id": [EVIL, 1], "digest": EVIL, "lba": EVIL}
            break
    events.append({"ev": "died", "t": 99_000, "epoch": 0, "thread": 0, "op": 12,
                   "kind": EVIL, "lba": 0, "error": EVIL})
    events.append({"ev": "invoke", "t": 99_500, "epoch": 0, "thread": 0, "op": 13,
                   "kind": EVIL, "lba": 0})
    events_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    verdict["violations"].append({"kind": "worker-died", "lba": None, "detail": EVIL,
                                  "survivor": {"kind": EVIL}, "contradicts": {
                                      "kind": EVIL, "thread": 0, "op": 13, "value": EVIL,
                                      "invoke_ns": EVIL, "ok_ns": None}})
    verdict["counts"]["worker-died"] = 1
    verdict["stats"] = {"reads": 3, "acked_writes": 2}
    run.record_cut(1, verdict, {EVIL: 1.0, "boot": 2.0})
    run.record_failure(EVIL + "\x00\x07\x1b[31m")
    run.finish()
    publish(run.run_dir)
    page = (run.run_dir / "report.html").read_text()
    assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;" in page
    ET.parse(run.run_dir / "junit.xml")  # control characters did not break the XML


# --- hypothesis: randomly damaged folders ------------------------------------------------

JSON_FILES = ["summary.json", "manifest.json", "cut-1/verdict.json", "cut-2/verdict.json",
              "cut-3/verdict.json"]
ALL_FILES = JSON_FILES + ["cut-1/events.jsonl", "cut-2/events.jsonl", "cut-3/events.jsonl",
                          "scenario.yaml", "cut-2/console.log"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.sampled_from(list("<>&\"'/\\;$`|\x00\x1b\n é") + ["<script>"]),
             max_size=12).map("".join),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


@st.composite
def damage(draw: Any) -> list[tuple[str, str, Any]]:
    """A few mutations: (file, how, argument)."""
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["truncate", "value", "delete", "bytes", "line", "drop-key"]))
        name = draw(st.sampled_from(JSON_FILES if how in ("value", "drop-key") else ALL_FILES))
        steps.append((name, how, draw(st.tuples(st.integers(0, 10**6), json_values,
                                                st.binary(max_size=64)))))
    return steps


def apply_damage(run_dir: Path, steps: list[tuple[str, str, Any]]) -> None:
    for name, how, (n, value, blob) in steps:
        path = run_dir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if how == "truncate":
            path.write_bytes(data[: n % (len(data) + 1)])
        elif how == "delete":
            path.unlink()
        elif how == "bytes":
            at = n % (len(data) + 1)
            path.write_bytes(data[:at] + blob + data[at + len(blob):])
        elif how == "line":
            lines = data.split(b"\n")
            lines.insert(n % (len(lines) + 1), json.dumps(value).encode())
            path.write_bytes(b"\n".join(lines))
        else:
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            paths = _paths(obj)
            target = paths[n % len(paths)]
            if how == "value":
                obj = _set(obj, target, value)
            elif target and isinstance(obj, dict | list):
                parent = obj
                for k in target[:-1]:
                    parent = parent[k]
                del parent[target[-1]]
            path.write_text(json.dumps(obj))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=damage())
def test_damaged_folders_never_crash_the_report_nor_leak_markup(
    pristine: Path, tmp_path: Path, steps: list[tuple[str, str, Any]]
) -> None:
    box = Path(tempfile.mkdtemp(prefix="box", dir=tmp_path))  # unique even when replayed
    run_dir = box / "r1"
    shutil.copytree(pristine, run_dir)
    apply_damage(run_dir, steps)
    problems = publish(run_dir)  # never raises
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page
    ET.parse(run_dir / "junit.xml")
    errors = junit_errors(run_dir)
    assert bool(problems) == bool(errors) or bool(load_run(run_dir).summary.get("failure"))
    if problems:
        assert 'class="damaged"' in page
    # a JSON file of the testbed's own that no longer parses is always reported
    for name in JSON_FILES:
        path = run_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except ValueError:
                assert any(p.startswith(name) for p in problems), (name, problems)
    assert sorted(p.name for p in box.iterdir()) == ["r1"]  # nothing written beside it
    shutil.rmtree(box)


def test_nan_and_infinite_numbers_in_verdicts_are_problems(run_dir: Path) -> None:
    path = run_dir / "cut-1" / "verdict.json"
    verdict = json.loads(path.read_text())
    verdict["wall_s"] = math.inf
    path.write_text(json.dumps(verdict))
    assert any("`wall_s` is invalid" in p for p in publish(run_dir))
