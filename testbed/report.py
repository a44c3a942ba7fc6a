"""junit.xml and report.html, rebuilt from a run folder's files alone (`testbed report RUN_DIR`).

The page is self-contained: inline CSS and SVG, no scripts, no external assets. Every value
from the folder (including what the guest wrote into the event stream) is escaped.

The folder is read, never trusted: a summary.json, manifest.json or verdict.json that is
missing where expected, not JSON, or not the shape the testbed writes is a *problem*: listed in
a red box at the top of the page and as JUnit errors, and `testbed report` exits 2. Nothing is
silently rendered around.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from testbed import events as events_mod
from testbed.results import (
    EVENTS,
    VERDICT,
    RunResults,
    copy_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

KIND_COLOURS = {"write": "#3b82c4", "zero": "#9aa5b1", "read": "#4caf6e"}
PHASE_COLOURS = ["#3b82c4", "#e0a030", "#4caf6e", "#b05cc4", "#d9534f", "#5bc0de", "#8d6e63",
                 "#c2185b", "#7cb342", "#5c6bc0", "#ff8a65", "#26a69a"]
TIMELINE_OPS = 160  # the last ops before the cut: where the interesting overlaps are
STATUSES = ("running", "passed", "violations", "failed")
CUT_DIR = re.compile(r"cut-(\d{1,9})")


@dataclass
class RunFolder:
    """What a run folder holds, checked: `problems` lists what is missing or corrupt (one line
    each); `summary` keeps only the fields that are valid; `cuts` only valid verdicts, and
    `bad_cuts` the cut numbers whose verdict.json is unusable."""

    summary: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    cuts: list[dict[str, Any]] = field(default_factory=list)
    bad_cuts: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _finite(x: Any, minimum: float = 0.0) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and x >= minimum)


def _count(x: Any, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _str_or_none(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _mapping_of(check: Any) -> Any:
    return lambda x: isinstance(x, dict) and all(
        isinstance(k, str) and check(v) for k, v in x.items())


SUMMARY_FIELDS: dict[str, Any] = {  # key -> validity test (absent optional keys are fine)
    "status": lambda x: x in STATUSES,
    "run_id": lambda x: isinstance(x, str),
    "scenario": lambda x: isinstance(x, str),
    "target": lambda x: isinstance(x, str),
    "failure": _str_or_none,
    "stopped": _str_or_none,
    "exit_code": lambda x: x is None or (_count(x) and x in (0, 1, 2)),
    "cuts": _count,
    "cuts_planned": _count,
    "cuts_with_violations": _count,
    "violations": _mapping_of(lambda v: _count(v, 1)),
    "elapsed_s": _finite,
    "cuts_per_min": _finite,
    "phases_s": _mapping_of(_finite),
    "cut_wall_s": _mapping_of(_finite),
    "shard": _str_or_none,
    "workers": _mapping_of(lambda w: isinstance(w, dict) and _count(w.get("cuts"))
                           and _finite(w.get("cuts_per_min"))
                           and _mapping_of(_finite)(w.get("phases_s"))),
    "resumed": lambda x: isinstance(x, list) and all(
        isinstance(r, dict) and isinstance(r.get("at"), str) and _count(r.get("cuts_done"))
        for r in x),
}
SUMMARY_REQUIRED = ("status", "cuts", "violations")


def _valid_violation(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("kind"), str)
            and (v.get("lba") is None or _count(v.get("lba")))
            and isinstance(v.get("detail"), str)
            and (v.get("survivor") is None or isinstance(v.get("survivor"), dict))
            and (v.get("contradicts") is None or _valid_contradicts(v["contradicts"])))


def _valid_contradicts(c: Any) -> bool:
    """The op a violation contradicts: its thread and op number index the timeline."""
    return isinstance(c, dict) and all(c.get(k) is None or _count(c.get(k))
                                       for k in ("thread", "op"))


VERDICT_FIELDS: dict[str, Any] = {
    "cut": _count,
    "ok": lambda x: isinstance(x, bool),
    "counts": _mapping_of(lambda v: _count(v, 1)),
    "violations": lambda x: isinstance(x, list) and all(_valid_violation(v) for v in x),
    "phases_s": _mapping_of(_finite),
    "wall_s": _finite,
    "stats": _mapping_of(lambda v: _count(v)),
    "cut_at_s": lambda x: x is None or _finite(x, -math.inf),
    "crash_image": _str_or_none,
}
VERDICT_REQUIRED = ("cut", "ok", "counts", "violations", "phases_s", "wall_s")


def _read_json(path: Path, problems: list[str], what: str, required: bool = True) -> Any:
    """The JSON value of `path`, or None with a problem noted (missing only if `required`)."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        if required:
            problems.append(f"{what}: missing")
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{what}: unreadable ({type(e).__name__}: {e})")
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        kind = "truncated" if text.strip() and isinstance(e, json.JSONDecodeError) and \
            e.pos >= len(text.rstrip()) else "not valid JSON"
        problems.append(f"{what}: {kind} ({e})")
        return None


def _check_fields(obj: Any, fields: dict[str, Any], required: tuple[str, ...], what: str,
                  problems: list[str]) -> dict[str, Any]:
    """The valid known fields of `obj` (unknown keys are kept as they are); a problem for each
    invalid or missing required one."""
    if not isinstance(obj, dict):
        problems.append(f"{what}: not a JSON object")
        return {}
    out = dict(obj)
    for key, test in fields.items():
        if key not in obj:
            if key in required:
                problems.append(f"{what}: `{key}` is missing")
            continue
        if not test(obj[key]):
            problems.append(f"{what}: `{key}` is invalid: {json.dumps(obj[key])[:80]}")
            del out[key]
    return out


def _check_verdict(obj: Any, n: int, what: str) -> tuple[dict[str, Any] | None, list[str]]:
    problems: list[str] = []
    verdict = _check_fields(obj, VERDICT_FIELDS, VERDICT_REQUIRED, what, problems)
    if problems:
        return None, problems
    if verdict["cut"] != n:
        problems.append(f"{what}: says cut {verdict['cut']}, its folder is cut-{n}")
    kinds = Counter(v["kind"] for v in verdict["violations"])
    if verdict["ok"] != (not verdict["violations"]) or dict(kinds) != verdict["counts"]:
        problems.append(f"{what}: `ok`, `counts` and `violations` disagree")
    return (None, problems) if problems else (verdict, [])


def load_run(run_dir: Path) -> RunFolder:
    """Read and check a run folder; whatever is missing or corrupt is in `problems`."""
    run = RunFolder()
    raw = _read_json(run_dir / "summary.json", run.problems, "summary.json")
    if raw is not None:
        run.summary = _check_fields(raw, SUMMARY_FIELDS, SUMMARY_REQUIRED, "summary.json",
                                    run.problems)
    manifest = _read_json(run_dir / "manifest.json", run.problems, "manifest.json")
    if manifest is not None:
        if isinstance(manifest, dict):
            run.manifest = manifest
        else:
            run.problems.append("manifest.json: not a JSON object")
    numbers = sorted(int(m.group(1)) for p in run_dir.glob("cut-*")
                     if (m := CUT_DIR.fullmatch(p.name)) and p.is_dir())
    counted = {int(k) for k in run.summary.get("cut_wall_s", {}) if k.isdigit()}
    for n in numbers:
        what = f"cut-{n}/{VERDICT}"
        problems: list[str] = []
        obj = _read_json(run_dir / f"cut-{n}" / VERDICT, problems, what, required=n in counted)
        if obj is None:
            if problems:
                run.bad_cuts[n] = problems[0]
            run.problems += problems
            continue
        verdict, problems = _check_verdict(obj, n, what)
        if verdict is None:
            run.bad_cuts[n] = problems[0]
            run.problems += problems
        else:
            run.cuts.append(verdict)
    for n in sorted(counted - set(numbers)):
        run.bad_cuts[n] = f"cut-{n}: summary.json counts this cut, its folder is missing"
        run.problems.append(run.bad_cuts[n])
    _check_consistency(run)
    return run


def _check_consistency(run: RunFolder) -> None:
    """The summary must not say less than the verdicts do (a summary that hides a violation
    would make the exit code lie)."""
    s = run.summary
    if "cuts" in s and len(run.cuts) + len(run.bad_cuts) < s["cuts"]:
        run.problems.append(f"summary.json counts {s['cuts']} cuts, the folder holds "
                            f"{len(run.cuts) + len(run.bad_cuts)}")
    if run.bad_cuts or "violations" not in s:
        return
    found: Counter[str] = Counter()
    for c in run.cuts:
        found.update(c["counts"])
    if dict(found) != s["violations"]:
        run.problems.append(f"summary.json says violations {json.dumps(s['violations'])}, the "
                            f"verdicts add up to {json.dumps(dict(found))}")
    elif s.get("status") == "passed" and found:
        run.problems.append("summary.json says passed, the verdicts hold violations")


class MergeError(ValueError):
    """Run folders that are not shards of one campaign, or a damaged one."""


def merge(out: Path, run_dirs: list[Path]) -> RunResults:
    """One run folder from shard folders: every cut folder copied, one summary over all of
    them (status and exit code as for a single run over every cut), JUnit and report by the
    caller (publish). Each shard is read with load_run's checks: a damaged one is refused
    (MergeError naming it and what is wrong), never merged around."""
    from testbed.scenario import parse_scenario

    shards = []
    for d in run_dirs:
        run = load_run(d)
        if run.problems:
            more = f" (+{len(run.problems) - 1} more)" if len(run.problems) > 1 else ""
            raise MergeError(f"{d} is damaged: {run.problems[0]}{more}")
        shards.append(run)
    texts = {(d / "scenario.yaml").read_text() for d in run_dirs}
    if len(texts) != 1:
        raise MergeError("the run folders ran different scenarios: not shards of one campaign")
    out.mkdir(parents=True)
    scenario = parse_scenario(texts.pop(), str(run_dirs[0] / "scenario.yaml"))
    merged = RunResults(out, scenario)
    for d, run in zip(run_dirs, shards, strict=True):
        for cut_dir in sorted(p for p in d.glob("cut-*") if CUT_DIR.fullmatch(p.name)):
            dst = out / cut_dir.name
            if dst.exists():
                raise MergeError(f"{cut_dir.name} is in more than one run folder")
            shutil.copytree(cut_dir, dst)
        merged.cuts += run.cuts
    merged.cuts.sort(key=lambda c: c["cut"])
    summaries = [run.summary for run in shards]
    for summary in summaries:
        for phase, seconds in (summary.get("run_phases_s") or {}).items():
            merged.run_phases[phase] = merged.run_phases.get(phase, 0.0) + seconds
    shard_notes = [(s.get("shard") or d.name, s) for d, s in zip(run_dirs, summaries, strict=True)]
    failures = [f"shard {name}: {s['failure']}" for name, s in shard_notes if s.get("failure")]
    stops = [f"shard {name}: {s['stopped']}" for name, s in shard_notes if s.get("stopped")]
    merged.failure = "; ".join(failures) or None
    merged.stopped = "; ".join(stops) or None
    merged.resumed = [{**r, "shard": name} for name, s in shard_notes
                      for r in s.get("resumed") or []]
    merged.elapsed_s = max(s.get("elapsed_s") or 0.0 for s in summaries)  # shards run at once
    copy_atomic(run_dirs[0] / "scenario.yaml", out / "scenario.yaml")
    manifests = [run.manifest for run in shards]
    write_json_atomic(out / "manifest.json", {**manifests[0], "run_id": out.name,
                                              "merged_from": manifests})
    merged.finish()
    return merged


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: Any) -> str:
    """Text XML 1.0 can carry (control characters from the guest would make it unparseable)."""
    return _XML_BAD.sub("\ufffd", str(text))


def write_junit(run_dir: str | Path, run: RunFolder | None = None) -> Path:
    """One testcase per cut; a cut with violations is a failure; a testbed failure, and a run
    folder with missing or corrupt files, an error."""
    run_dir = Path(run_dir)
    run = run or load_run(run_dir)
    summary, cuts = run.summary, run.cuts
    name = _xml(summary.get("scenario", run_dir.name))
    failure = summary.get("failure")
    other_problems = [p for p in run.problems if p not in run.bad_cuts.values()]
    errors = (1 if failure else 0) + len(run.bad_cuts) + (1 if other_problems else 0)
    suite = ET.Element(
        "testsuite",
        name=f"testbed.{name}",
        tests=str(len(cuts) + errors),
        failures=str(sum(1 for c in cuts if not c["ok"])),
        errors=str(errors),
        time=f"{sum(c['wall_s'] for c in cuts):.3f}",
    )
    rows: list[tuple[int, ET.Element]] = []
    for c in cuts:
        case = ET.Element("testcase", classname=f"testbed.{name}", name=f"cut-{c['cut']}",
                          time=f"{c['wall_s']:.3f}")
        if not c["ok"]:
            counts = ", ".join(f"{k} x{n}" for k, n in c["counts"].items())
            node = ET.SubElement(case, "failure", message=_xml(counts), type="violation")
            node.text = _xml("\n".join(_evidence_line(v) for v in c["violations"]))
        rows.append((c["cut"], case))
    for n, problem in run.bad_cuts.items():
        case = ET.Element("testcase", classname=f"testbed.{name}", name=f"cut-{n}")
        ET.SubElement(case, "error", message=_xml(problem), type="corrupt-run-folder")
        rows.append((n, case))
    for _, case in sorted(rows, key=lambda r: r[0]):
        suite.append(case)
    if failure:
        case = ET.SubElement(suite, "testcase", classname=f"testbed.{name}", name="testbed")
        ET.SubElement(case, "error", message=_xml(failure), type="testbed-failure")
    if other_problems:
        case = ET.SubElement(suite, "testcase", classname=f"testbed.{name}", name="run-folder")
        node = ET.SubElement(case, "error", message=_xml(other_problems[0]),
                             type="corrupt-run-folder")
        node.text = _xml("\n".join(other_problems))
    path = run_dir / "junit.xml"
    write_bytes_atomic(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))
    return path


def _evidence_line(v: dict[str, Any], start_ns: float | None = None) -> str:
    """One line of evidence; guest times as t+seconds from the round's start when known."""

    def at(ns: Any) -> str:
        if ns is None:
            return "no ack"
        if not _finite(ns, -math.inf):
            return str(ns)
        return f"t+{(ns - start_ns) / 1e9:.6f} s" if start_ns is not None else f"{ns} ns"

    where = f"lba {v['lba']}: " if v.get("lba") is not None else ""
    parts = [f"{v['kind']}: {where}{v['detail']}"]
    if v.get("survivor"):
        parts.append(f"survivor {_value(v['survivor'])}")
    if c := v.get("contradicts"):
        parts.append(
            f"vs {c.get('kind')} thread {c.get('thread')} op {c.get('op')} "
            f"({_value(c.get('value'))}, invoke {at(c.get('invoke_ns'))}, "
            f"ok {at(c.get('ok_ns'))})"
        )
    return "; ".join(parts)


def _value(v: Any) -> str:
    """A block value as text, whatever the (guest-written) object holds."""
    if not isinstance(v, dict):
        return f"?{str(v)[:40]}"
    kind = v.get("kind")
    wid = v.get("write_id")
    wid_text = "/".join(map(str, wid)) if isinstance(wid, list) else ""
    if kind == "write":
        return "write " + wid_text
    if kind == "phantom":
        return f"phantom of lba {v.get('lba')} " + wid_text
    if kind == "torn":
        return f"torn #{str(v.get('digest', ''))[:8]}"
    return str(kind)[:40]


# --- the HTML page -----------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d2430}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} th{background:#f4f6f8}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
.passed{background:#2e8b57} .violations{background:#c62828} .failed{background:#e08a00}
.running{background:#607d8b} .ok{color:#2e8b57;font-weight:600} .bad{color:#c62828;font-weight:600}
.muted{color:#68707a} code,pre{font:12px/1.4 ui-monospace,monospace} pre{background:#f6f8fa;
padding:8px;overflow-x:auto;white-space:pre-wrap} svg{display:block;margin:6px 0}
details{margin:8px 0} summary{cursor:pointer}
.damaged{border:2px solid #c62828;background:#fdecea;padding:8px 12px;margin:12px 0}
"""


def publish(run_dir: str | Path) -> list[str]:
    """Re-render report.html and junit.xml from what the run folder holds now; the problems
    found in it (missing or corrupt files), [] for a sound folder."""
    run = load_run(Path(run_dir))
    render_report(run_dir, run)  # also notes corrupt event streams
    write_junit(run_dir, run)
    return run.problems


def render_report(run_dir: str | Path, run: RunFolder | None = None) -> Path:
    run_dir = Path(run_dir)
    run = run or load_run(run_dir)
    summary, manifest, cuts = run.summary, run.manifest, run.cuts
    status = summary.get("status", "running")
    title = f"testbed run {summary.get('run_id', run_dir.name)}"
    sections = [_cut_section(run_dir, c, run.problems) for c in cuts]
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p><span class="badge {escape(status)}">{escape(status)}</span> '
        f"scenario <b>{escape(str(summary.get('scenario', '?')))}</b> · target "
        f"<b>{escape(str(summary.get('target', '?')))}</b> · "
        f"seed {escape(str(manifest.get('seed')))}"
        "</p>",
    ]
    if run.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in run.problems)
        body.append('<div class="damaged"><b>This run folder is damaged: what it shows is '
                    f"incomplete or cannot be trusted.</b><ul>{items}</ul></div>")
    if summary.get("failure"):
        body.append(f'<p class="bad">Testbed failure: {escape(summary["failure"])}</p>')
    if summary.get("stopped"):
        body.append(f'<p class="bad">{escape(summary["stopped"])}</p>')
    body += _summary_section(summary)
    body += _phases_section(summary, cuts)
    body += _verdict_table(cuts, run.bad_cuts)
    body += sections
    body += _manifest_section(manifest)
    return _write_page(run_dir, title, CSS, body)


def _write_page(run_dir: Path, title: str, css: str, body: list[str]) -> Path:
    """report.html of `run_dir`: the body's fragments (escaped by their makers) in one page."""
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{css}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path


def _summary_section(s: dict[str, Any]) -> list[str]:
    violations = s.get("violations") or {}
    vtext = ", ".join(f"{k}: {n}" for k, n in violations.items()) or "none"
    rows = [
        ("Cuts", f"{s.get('cuts', 0)} of {s.get('cuts_planned', '?')}"),
        ("Violations", vtext),
        ("Cuts with violations", s.get("cuts_with_violations", 0)),
        ("Cuts per minute", s.get("cuts_per_min", 0)),
        ("Elapsed", _duration(s.get("elapsed_s", 0))),
        ("Exit code", s.get("exit_code")),
    ]
    for r in s.get("resumed") or []:
        rows.append(("Resumed", f"{r['at']} after {r['cuts_done']} finished cuts"
                                + (f" (it had stopped: {r['previous']})" if r.get("previous")
                                   else "")))
    cells = "".join(f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return ["<h2>Summary</h2>", f"<table>{cells}</table>"]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m{secs:04.1f}s" if minutes else f"{secs:.1f}s"


def _phases_section(summary: dict[str, Any], cuts: list[dict[str, Any]]) -> list[str]:
    phases = summary.get("phases_s") or {}
    if not phases:
        return []
    colours = {p: PHASE_COLOURS[i % len(PHASE_COLOURS)] for i, p in enumerate(phases)}
    return [
        "<h2>Time breakdown</h2>",
        "<h3>Total seconds per phase</h3>",
        _phase_bars(phases, colours),
        "<h3>Seconds per cut</h3>",
        _cut_stacks(cuts, colours),
        *_workers_table(summary.get("workers") or {}),
    ]


def _workers_table(workers: dict[str, Any]) -> list[str]:
    """Per chain of rounds (`testbed run --jobs`): cuts per minute and seconds per phase."""
    if not workers:
        return []
    phases = list(dict.fromkeys(p for w in workers.values() for p in w["phases_s"]))
    head = "".join(f"<th>{escape(p)} s</th>" for p in phases)
    rows = [f"<tr><td>{escape(name)}</td><td>{w['cuts']}</td><td>{w['cuts_per_min']:.2f}</td>"
            + "".join(f"<td>{w['phases_s'].get(p, 0.0):.1f}</td>" for p in phases) + "</tr>"
            for name, w in workers.items()]
    return ["<h3>Per worker</h3>",
            f"<table><tr><th>worker</th><th>cuts</th><th>cuts/min</th>{head}</tr>",
            *rows, "</table>"]


def _phase_bars(phases: dict[str, float], colours: dict[str, str]) -> str:
    width, label_w, bar_h = 760, 110, 22
    longest = max(phases.values()) or 1.0
    rows = []
    for i, (phase, secs) in enumerate(phases.items()):
        y = i * (bar_h + 6)
        w = (width - label_w - 90) * secs / longest
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(phase)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colours[phase]}">'
            f"<title>{escape(phase)}: {secs:.1f} s</title></rect>"
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{_duration(secs)}</text>'
        )
    height = len(phases) * (bar_h + 6)
    return _svg(width, height, "".join(rows))


def _cut_stacks(cuts: list[dict[str, Any]], colours: dict[str, str]) -> str:
    if not cuts:
        return '<p class="muted">No cut finished yet.</p>'
    width, height, left, bottom = 760, 180, 40, 34
    longest = max(c["wall_s"] for c in cuts) or 1.0
    slot = (width - left) / len(cuts)
    bar_w = max(2.0, min(28.0, slot * 0.7))
    parts = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        'stroke="#999"/>',
        f'<text x="0" y="12" class="muted">{_duration(longest)}</text>',
    ]
    for i, c in enumerate(cuts):
        x = left + i * slot + (slot - bar_w) / 2
        y = height - bottom
        for phase, secs in c["phases_s"].items():
            h = (height - bottom - 16) * secs / longest
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colours.get(phase, "#888")}"><title>cut {c["cut"]} {escape(phase)}: '
                f"{secs:.1f} s</title></rect>"
            )
        if len(cuts) <= 40 or i % 5 == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                f"{c['cut']}</text>"
            )
    legend_x = left
    for phase, colour in colours.items():
        parts.append(
            f'<rect x="{legend_x}" y="{height - 12}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{height - 3}">{escape(phase)}</text>'
        )
        legend_x += 24 + 8 * len(phase)
    return _svg(width, height, "".join(parts))


def _svg(width: float, height: float, inner: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-size="12" font-family="system-ui,sans-serif">'
        f"{inner}</svg>"
    )


def _verdict_table(cuts: list[dict[str, Any]], bad_cuts: dict[int, str]) -> list[str]:
    rows: list[tuple[int, str]] = []
    for c in cuts:
        verdict = (
            '<span class="ok">ok</span>'
            if c["ok"]
            else (
                '<span class="bad">'
                + escape(", ".join(f"{k} x{n}" for k, n in c["counts"].items()))
                + "</span>"
            )
        )
        stats = c.get("stats") or {}
        cut_at = "" if c.get("cut_at_s") is None else f"{c['cut_at_s']:.2f}"
        cells = "".join(f"<td>{escape(str(stats.get(k, '')))}</td>"
                        for k in ("acked_writes", "indeterminate_writes", "reads"))
        rows.append((c["cut"],
            f'<tr><td><a href="#cut-{c["cut"]}">cut {c["cut"]}</a></td><td>{verdict}</td>'
            f"{cells}<td>{cut_at}</td><td>{_duration(c['wall_s'])}</td>"
            f"<td>{'crash image kept' if c.get('crash_image') else ''}</td></tr>"
        ))
    for n, problem in bad_cuts.items():
        rows.append((n, f'<tr><td>cut {n}</td><td colspan="7"><span class="bad">no verdict: '
                        f"{escape(problem)}</span></td></tr>"))
    head = (
        "<tr><th>Cut</th><th>Verdict</th><th>Acked updates</th><th>In flight</th><th>Reads</th>"
        "<th>Cut at (s)</th><th>Wall</th><th></th></tr>"
    )
    body = "".join(row for _, row in sorted(rows, key=lambda r: r[0]))
    return ["<h2>Verdicts</h2>", f"<table>{head}{body}</table>"]


def _cut_section(run_dir: Path, c: dict[str, Any], problems: list[str]) -> str:
    n = c["cut"]
    events_path = run_dir / f"cut-{n}" / EVENTS
    events, note = _report_events(events_path, f"cut-{n}/{EVENTS}")
    if note:
        problems.append(note)
    bad_lbas = {v.get("lba") for v in c["violations"]} - {None}  # lba: optional
    start = next((e["t"] for e in events if e["ev"] == "start"), None)
    parts = [f'<h3 id="cut-{n}">Cut {n}</h3>']
    step = _step_line(c.get("step"))
    if step:
        parts.append(f"<p>{escape(step)}</p>")
    if c["violations"]:
        items = "".join(
            f"<li><code>{escape(_evidence_line(v, start))}</code></li>" for v in c["violations"]
        )
        parts.append(f"<ul>{items}</ul>")
    culprits = {  # only well-formed (thread, op) pairs: a damaged record may hold anything
        (v["contradicts"].get("thread"), v["contradicts"].get("op"))
        for v in c["violations"]
        if v.get("contradicts") and _count(v["contradicts"].get("thread"))
        and _count(v["contradicts"].get("op"))
    }
    if note:
        parts.append(f'<p class="bad">{escape(note)}</p>')
    parts.append(_timeline(events, c.get("cut_at_s"), bad_lbas, culprits))
    links = " · ".join(
        f'<a href="cut-{n}/{name}">{name}</a>'
        for name in ("console.log", "qmp-events.log", EVENTS, "recovery.json", VERDICT)
        if (run_dir / f"cut-{n}" / name).exists()
    )
    parts.append(f'<p class="muted">{links}</p>')
    return "\n".join(parts)


def _step_line(step: Any) -> str:
    """Where an at_step cut landed ('' for other cuts); the record is not trusted: any value
    shows as text."""
    if not isinstance(step, dict):
        return ""
    want = f"{step.get('label')} #{step.get('nth')} of thread {step.get('thread')}"
    if step.get("reached") is not True:
        return f"Step {want} never reached: cut after the round ended."
    at = step.get("at")
    if not isinstance(at, dict):
        at = {}
    return (f"Cut at step {want}: thread {at.get('thread')} held there in op {at.get('op')} "
            f"({at.get('kind')} of lba {at.get('lba')}).")


def _report_events(path: Path, what: str) -> tuple[list[dict[str, Any]], str | None]:
    """The well-formed events of a cut for the timeline, and a note when the file is corrupt or
    holds malformed events (the guest writes them: nothing in them is trusted)."""
    if not path.exists():
        return [], None
    try:
        raw = events_mod.read(path)
    except (OSError, events_mod.EventStreamError) as e:
        return [], f"{what}: {e}"
    good = [e for e in raw if _well_formed(e)]
    if len(good) < len(raw):
        return good, f"{what}: {len(raw) - len(good)} malformed events left out of the timeline"
    return good, None


def _well_formed(e: dict[str, Any]) -> bool:
    ev = e.get("ev")
    if not isinstance(ev, str) or not _finite(e.get("t"), -math.inf):
        return False
    if ev in ("invoke", "ok", "fail"):
        return (_count(e.get("thread")) and _count(e.get("op")) and isinstance(e.get("kind"), str)
                and _count(e.get("lba")))
    return True


def _timeline(
    events: list[dict[str, Any]],
    cut_at_s: float | None,
    bad_lbas: set[int],
    culprits: set[tuple[int, int]],
) -> str:
    """Op intervals per thread (the last TIMELINE_OPS before the cut), ops cut short drawn up
    to the cut line with a red outline, ops on LBAs with a violation outlined in black and the
    op a violation names as evidence marked with a red triangle."""
    start = next((e["t"] for e in events if e.get("ev") == "start"), None)
    invokes = {(e["thread"], e["op"]): e for e in events if e.get("ev") == "invoke"}
    results = {(e["thread"], e["op"]): e for e in events if e.get("ev") in ("ok", "fail")}
    if start is None or not invokes:
        return '<p class="muted">No workload events were received before this cut.</p>'
    last_t = max(e["t"] for e in events)
    cut_t = start + cut_at_s * 1e9 if cut_at_s is not None else last_t
    cut_t = max(cut_t, last_t)  # host and guest clocks differ; never draw ops past the cut
    shown = sorted(invokes.values(), key=lambda e: e["t"])[-TIMELINE_OPS:]
    t0 = shown[0]["t"]
    threads = sorted({e["thread"] for e in invokes.values()})
    width, left, row_h, top = 1000, 70, 22, 10
    span = max(cut_t - t0, 1) * 1.1  # room right of the cut line for its label
    scale = (width - left - 10) / span
    parts = []
    for i, th in enumerate(threads):
        y = top + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">thread {th}</text>')
        parts.append(
            f'<line x1="{left}" y1="{y + row_h - 2}" x2="{width}" y2="{y + row_h - 2}" '
            'stroke="#eee"/>'
        )
    for inv in shown:
        key = (inv["thread"], inv["op"])
        res = results.get(key)
        acked = res is not None and res["ev"] == "ok"
        end = res["t"] if res is not None and acked else cut_t
        x = left + (inv["t"] - t0) * scale
        w = max(1.5, (end - inv["t"]) * scale)
        y = top + threads.index(inv["thread"]) * row_h + 3
        stroke = ' stroke="#000" stroke-width="1.5"' if inv["lba"] in bad_lbas else ""
        if not acked:
            stroke = ' stroke="#c62828" stroke-width="1.5" stroke-dasharray="3 2"'
        if key in culprits:
            parts.append(
                f'<path d="M{x + w / 2 - 5:.1f},{y - 4} h10 l-5,6 z" fill="#c62828">'
                f"<title>evidence: {escape(inv['kind'])} op {inv['op']}</title></path>"
            )
        seen = ""
        if res is not None and "value" in res:
            seen = f" saw {_value(res['value'])}"
        status = "ok" if acked else ("failed" if res else "in flight at the cut")
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 8}" rx="2" '
            f'fill="{KIND_COLOURS.get(inv["kind"], "#888")}"{stroke}><title>{escape(inv["kind"])} '
            f"lba {inv['lba']} op {inv['op']} ({status}){escape(seen)}, "
            f"t+{(inv['t'] - start) / 1e9:.4f} s</title></rect>"
        )
    cut_x = left + (cut_t - t0) * scale
    bottom = top + len(threads) * row_h
    parts.append(
        f'<line x1="{cut_x:.1f}" y1="0" x2="{cut_x:.1f}" y2="{bottom + 4}" stroke="#c62828" '
        f'stroke-width="2"/><text x="{cut_x - 4:.1f}" y="{bottom + 16}" text-anchor="end" '
        'fill="#c62828">cut</text>'
    )
    parts.append(
        f'<text x="{left}" y="{bottom + 16}" fill="#68707a">t+{(t0 - start) / 1e9:.3f} s</text>'
        f'<text x="{cut_x + 4:.1f}" y="{bottom + 16}" fill="#68707a">'
        f"t+{(cut_t - start) / 1e9:.3f} s</text>"
    )
    legend = " ".join(
        f'<span style="color:{colour}">■</span> {kind}' for kind, colour in KIND_COLOURS.items()
    )
    caption = (
        f'<p class="muted">Last {len(shown)} ops before the cut. {legend} · dashed red: no ack '
        "received · black outline: LBA with a violation · red triangle: the op named as "
        "evidence.</p>"
    )
    return _svg(width, bottom + 22, "".join(parts)) + caption


def _manifest_section(manifest: dict[str, Any]) -> list[str]:
    text = escape(json.dumps(manifest, indent=2))
    return [
        "<h2>Manifest</h2>",
        f"<details><summary>versions, accelerator, command lines</summary><pre>{text}</pre>"
        "</details>",
    ]


# --- testbed explore -------------------------------------------------------------------------

EXPLORE_STEPS = 80  # the last steps before the crash point shown per reproduction
EXPLORE_CSS = """
table.steps th.thread{width:300px}
table.steps td{padding:1px 8px;border-bottom:1px solid #f2f2f2;font:12px/1.4 ui-monospace,monospace}
table.steps td.write{background:#e3eef8} table.steps td.read{background:#e6f4ea}
table.steps td.ret{font-weight:600} tr.crash td{border-top:3px solid #c62828;color:#c62828;
font-weight:600} tr.lost td{color:#c62828}
"""


def render_explore_report(run_dir: str | Path) -> Path:
    """report.html of a `testbed explore` folder: its summary, and for each violation kind the
    shortest reproduction as a per-thread step timeline (PlusCal labels in order, the crash
    point marked) with the dirty lines and which of them were lost."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    status = "violations" if summary.get("violations") else "passed"
    title = f"testbed explore {summary.get('run_id', run_dir.name)}"
    params = summary.get("params", {})
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p><span class="badge {status}">{status}</span> '
        + " · ".join(f"{escape(str(k))} <b>{escape(str(v))}</b>" for k, v in params.items()
                     if v not in ("", None, False))
        + "</p>",
    ]
    violations = summary.get("violations") or {}
    rows = [
        ("Violations (crash states)", ", ".join(f"{k}: {n}" for k, n in violations.items())
         or "none"),
        ("Interleavings", summary.get("interleavings")),
        ("Crash points", summary.get("crash_points")),
        ("Crash states", summary.get("states")),
        ("Distinct images recovered", summary.get("distinct_images")),
        ("Oracle verdicts computed", summary.get("judged")),
        ("Complete enumeration", "yes" if summary.get("complete") else "no: " + "; ".join(
            why for why, cond in (
                ("schedules capped before the bounded space was exhausted",
                 not summary.get("schedules_exhausted")),
                (f"crash states sampled at {summary.get('sampled_crash_points')} crash points",
                 summary.get("sampled_crash_points"))) if cond)),
        ("States per second", summary.get("states_per_s")),
        ("Elapsed", _duration(summary.get("elapsed_s", 0))),
        ("Exit code", summary.get("exit_code")),
    ]
    cells = "".join(f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    body += ["<h2>Summary</h2>", f"<table>{cells}</table>"]
    for repro in summary.get("reproductions", []):
        path = run_dir / str(repro.get("file", ""))
        try:
            body += _explore_reproduction(json.loads(path.read_text()), repro)
        except (OSError, ValueError, KeyError, TypeError) as e:
            body.append(f'<div class="damaged">{escape(path.name)}: cannot be shown: '
                        f"{escape(str(e))}</div>")
    return _write_page(run_dir, title, CSS + EXPLORE_CSS, body)


def write_explore_junit(run_dir: str | Path) -> Path:
    """junit.xml of a `testbed explore` folder: one testcase per violation kind (a failure
    carrying its shortest reproduction's replay command), or one passing testcase."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    violations = summary.get("violations") or {}
    suite = ET.Element("testsuite", name="testbed.explore", tests=str(max(1, len(violations))),
                       failures=str(len(violations)), errors="0",
                       time=f"{summary.get('elapsed_s', 0):.3f}")
    by_kind = {r.get("kind"): r for r in summary.get("reproductions", [])}
    for kind, n in sorted(violations.items()):
        case = ET.SubElement(suite, "testcase", classname="testbed.explore", name=_xml(kind))
        repro = by_kind.get(kind, {})
        node = ET.SubElement(case, "failure", type="violation",
                             message=_xml(f"{kind} in {n} crash states"))
        node.text = _xml(f"shortest: crash after {repro.get('crash_after_steps')} steps, LBA "
                         f"{repro.get('lba')}; {repro.get('replay', '')}")
    if not violations:
        ET.SubElement(suite, "testcase", classname="testbed.explore",
                      name=f"{summary.get('states', 0)} crash states")
    path = run_dir / "junit.xml"
    write_bytes_atomic(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))
    return path


def _explore_reproduction(r: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    threads = int(r["params"]["threads"])
    steps = r["steps"]
    oks = {(e["thread"], e["op"]): e for e in r["history"] if e.get("ev") == "ok"}
    last_of_op = {(st["thread"], st["op"]): i for i, st in enumerate(steps)}
    plan = r.get("plan") or []
    out = [
        f"<h2>{escape(str(r['kind']))} on LBA {escape(str(r.get('lba')))}</h2>",
        f"<p>{escape(str(r.get('detail', '')))}. Shortest reproduction found: a crash after "
        f"<b>{len(steps)}</b> steps (interleaving {escape(str(r.get('interleaving')))}). "
        f"Replay: <code>{escape(str(entry.get('replay', '')))}</code></p>",
    ]
    first = max(0, len(steps) - EXPLORE_STEPS)
    head = "".join(f'<th class="thread">thread {t}</th>' for t in range(threads))
    rows = []
    if first:
        rows.append(f'<tr><td class="muted" colspan="{threads + 1}">{first} earlier steps not '
                    "shown</td></tr>")
    for i in range(first, len(steps)):
        st = steps[i]
        t, op = int(st["thread"]), int(st["op"])
        kind = plan[t][op]["kind"] if t < len(plan) and op < len(plan[t]) else ""
        text = f"{escape(str(st['label']))} <span class=\"muted\">op {op}</span>"
        cls = escape(kind)
        ok = oks.get((t, op))
        if ok is not None and last_of_op.get((t, op)) == i:
            seen = f" saw {_value(ok['value'])}" if "value" in ok else ""
            text += f" → returned{escape(seen)}"
            cls += " ret"
        cols = "".join(f'<td class="{cls}">{text}</td>' if c == t else "<td></td>"
                       for c in range(threads))
        rows.append(f'<tr><td class="muted">{i + 1}</td>{cols}</tr>')
    rows.append(f'<tr class="crash"><td colspan="{threads + 1}">⚡ crash point: power lost '
                "after this step; the dirty lines below reached the media as listed</td></tr>")
    out += ["<h3>Schedule (one row per PlusCal step, in order)</h3>",
            f'<table class="steps"><tr><th>step</th>{head}</tr>{"".join(rows)}</table>']
    line_rows = []
    for d in r.get("dirty_lines", []):
        reached = int(d["reached"])
        state = ("lost (the media keeps its older content)" if reached == 0 else
                 f"version {reached} of {d['versions']} reached the media"
                 + (" (a later one was lost)" if d.get("lost") else ""))
        line_rows.append(f'<tr class="{"lost" if d.get("lost") else ""}"><td>{d["line"]}</td>'
                         f"<td>{d['offset']:#x}</td><td>{escape(str(d['region']))}</td>"
                         f"<td>{escape(state)}</td></tr>")
    if line_rows:
        out += ["<h3>Dirty lines at the crash point</h3>",
                "<table><tr><th>line</th><th>offset</th><th>region</th><th>at the crash</th>"
                f"</tr>{''.join(line_rows)}</table>"]
    else:
        out.append('<p class="muted">No dirty line at the crash point.</p>')
    text = escape(json.dumps(r.get("violation"), indent=1))
    out.append(f"<details><summary>oracle verdict</summary><pre>{text}</pre></details>")
    return out
