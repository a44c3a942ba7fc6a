"""Scenario files: a YAML campaign, validated against a fixed schema into frozen dataclasses.

Validation walks the composed YAML node tree (not the loaded dict) so every error can name the
file, the line and the dotted key: `scenarios/x.yaml:12: workload.threads: expected ...`.
"""

from __future__ import annotations

import math
import os
import random
import stat
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from btt8.pmem import PERSISTENCE_MODELS
from btt8.steps import CREATE_LABELS, READ_LABELS, WRITE_LABELS

from testbed.clients import CLIENTS
from testbed.qemu_cmdline import NAME_RE
from testbed.restart import RESTARTS
from testbed.targets import TARGETS, TargetSpec, driver_class, make_target, namespaces_of

ACCELS = ("auto", "kvm", "tcg")
ON_UNRECOVERABLE = ("stop", "reformat")
DURING = ("workload", "create")  # what a cut round runs and cuts: cuts.during
RANDOM_LABEL = "random"  # at_step.label: drawn per cut from the labels the round reaches
MIN_NVDIMM_MIB = 16  # one region alignment unit
MIB = 1 << 20

# Safety limits of the loader: a scenario is a small hand-written file.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of mappings and lists; the schema itself needs 4
# Sane upper bounds, fixed ones (host-derived ones: HostLimits).
MAX_CUTS = 10_000  # a week of cuts at one a minute
MAX_THREADS = 256
MAX_OPS = 10_000_000  # per thread, per round
MAX_ACKS = 10_000_000
MAX_SECONDS = 86_400.0  # any duration or timeout: one day
MAX_WEIGHT = 1e6  # mix weights; their sum must stay finite
MAX_BSIZE = 16 * MIB
MAX_LABEL_KIB = 16 * 1024
MAX_NVDIMM_MIB = 1 << 20  # 1 TiB, whatever the disk says
MAX_MEMORY_MIB = 1 << 20
MAX_SMP = 255  # QEMU's pc machine
MAX_TEXT = 4096
SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
MAPPING_TAG, SEQUENCE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


@dataclass(frozen=True)
class HostLimits:
    """Upper bounds that depend on the machine the campaign runs on."""

    cores: int
    memory_mib: int
    disk_free_mib: int  # where NVDIMM backing files and crash images go (the temp folder)

    @classmethod
    def probe(cls) -> HostLimits:
        cores = os.cpu_count() or 1
        try:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB
        except (ValueError, OSError):
            memory = MAX_MEMORY_MIB
        try:
            st = os.statvfs(tempfile.gettempdir())
            disk = st.f_bavail * st.f_frsize // MIB
        except OSError:
            disk = MAX_NVDIMM_MIB
        return cls(cores, memory, disk)

    @property
    def smp(self) -> int:
        """vCPUs: this host's cores (2 at least: TCG runs 2 vCPUs fine on one core)."""
        return min(MAX_SMP, max(2, self.cores))

    @property
    def nvdimm_mib(self) -> int:
        """The backing file plus one crash image copy must fit the free disk."""
        return min(MAX_NVDIMM_MIB, self.disk_free_mib // 2)


class ScenarioError(ValueError):
    """A scenario file that does not match the schema; the message names file:line: key."""


@dataclass(frozen=True)
class NvdimmSize:
    """The scenario's `vm.nvdimm` (the host-side file is testbed.nvdimm.NvdimmSpec)."""

    size_mib: int = 512
    label_kib: int = 128


@dataclass(frozen=True)
class VmSpec:
    memory_mib: int = 1024
    smp: int = 2
    accel: str = "auto"
    nvdimm: NvdimmSize = NvdimmSize()


@dataclass(frozen=True)
class MixSpec:
    read: float = 0.0
    write: float = 0.0
    zero: float = 0.0


@dataclass(frozen=True)
class WorkloadSpec:
    threads: int
    lbas: int
    mix: MixSpec
    ops: int | None = None  # per thread, per cut round
    duration_s: float | None = None


@dataclass(frozen=True)
class StepSpec:
    """Cut when a thread reaches a step (btt8.steps label) for the nth time in the round."""

    label: str  # a label of btt8.steps, or RANDOM_LABEL: drawn per cut
    thread: int | None = None  # the workload thread, or None: any thread
    nth: tuple[int, int] = (1, 1)  # drawn per cut from [lo, hi]


@dataclass(frozen=True)
class CutWhen:
    after_s: tuple[float, float] | None = None  # seeded-random delay after the workload starts
    after_acks: int | None = None  # cut once this many writes are acknowledged
    at_step: StepSpec | None = None  # the agent holds a thread at a step, the host cuts there


@dataclass(frozen=True)
class CutsSpec:
    count: int
    when: CutWhen
    restart: str = "snapshot"  # a restart strategy (testbed.restart.RESTARTS)
    on_unrecoverable: str = "stop"  # or reformat the target and go on
    during: str = "workload"  # or "create": each round formats the target and cuts that


@dataclass(frozen=True)
class TimeoutsSpec:
    boot_s: float = 300.0
    workload_s: float = 600.0
    recover_s: float = 300.0


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    target: TargetSpec
    workload: WorkloadSpec
    cuts: CutsSpec
    vm: VmSpec = VmSpec()
    timeouts: TimeoutsSpec = TimeoutsSpec()
    description: str = ""

    def cut_delay_s(self, cut: int) -> float | None:
        """Seconds after the workload's start event to cut number `cut` (1-based): seeded, so a
        campaign replays the same instants; None when cuts trigger on acks instead."""
        window = self.cuts.when.after_s
        if window is None:
            return None
        return random.Random(f"{self.seed}:cut:{cut}").uniform(*window)

    def step_labels(self) -> tuple[str, ...]:
        """The labels a round of this scenario passes through (what `label: random` draws
        from): create's, or those of the op kinds in the mix (a zero op writes no block)."""
        if self.cuts.during == "create":
            return CREATE_LABELS
        mix = self.workload.mix
        labels: tuple[str, ...] = READ_LABELS if mix.read else ()
        if mix.write:
            labels += WRITE_LABELS
        elif mix.zero:
            labels += tuple(label for label in WRITE_LABELS if label != "WwriteBlock")
        return labels

    def cut_step(self, cut: int) -> dict[str, Any] | None:
        """The agent's `at_step` for cut number `cut`: label and nth drawn from the seed and the
        cut number (so a campaign replays them), or None when cuts are not at a step."""
        step = self.cuts.when.at_step
        if step is None:
            return None
        draw = random.Random(f"{self.seed}:step:{cut}")
        label = draw.choice(self.step_labels()) if step.label == RANDOM_LABEL else step.label
        return {"label": label, "thread": step.thread, "nth": draw.randint(*step.nth),
                "hold_s": self.timeouts.workload_s}

    def create_config(self, target: dict[str, Any], events: str, epoch: int) -> dict[str, Any]:
        """The agent's `create` config for cut round `epoch` (cuts.during: create)."""
        config = {"target": target, "seed": self.seed, "epoch": epoch, "events": events}
        step = self.cut_step(epoch)
        if step is not None:
            config["at_step"] = step
        return config

    def workload_config(
        self, target: dict[str, Any], events: str, epoch: int, resume: list[int] | None = None
    ) -> dict[str, Any]:
        """Stdin of `python3 -m tbagent workload` for cut round `epoch` (the cut number);
        `target` is the driver's agent_target()."""
        w = self.workload
        config: dict[str, Any] = {
            "target": target,
            "seed": self.seed,
            "epoch": epoch,
            "threads": w.threads,
            "lbas": w.lbas,
            "mix": asdict(w.mix),
            "resume": resume or [0] * w.threads,
            "events": events,
        }
        if w.ops is not None:
            config["ops"] = w.ops
        else:
            config["duration_s"] = w.duration_s
        step = self.cut_step(epoch)
        if step is not None:
            config["at_step"] = step
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `parse_scenario(yaml.safe_dump(...))` turns back into an equal object."""
        return {k: v for k, v in _drop_none(asdict(self)).items() if v != ""}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple | list):
        return [_drop_none(v) for v in value]
    return value


def load_scenario(path: str | Path, limits: HostLimits | None = None) -> Scenario:
    """Read and validate a scenario file. Only a regular file of at most MAX_FILE_BYTES of
    UTF-8 text is read (a FIFO or a device is refused without being opened for long)."""
    path = Path(path)
    source = _printable(str(path))
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ScenarioError(f"{source}:1: (file): not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
                raise ScenarioError(f"{source}:1: (file): not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise ScenarioError(f"{source}:1: (file): cannot read: {e.strerror}") from e
    if len(data) > MAX_FILE_BYTES:
        raise ScenarioError(f"{source}:1: (file): larger than {MAX_FILE_BYTES >> 10} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ScenarioError(f"{source}:{line}: (file): not UTF-8 text "
                            f"(byte {data[e.start]:#04x} at offset {e.start})") from e
    return parse_scenario(text, source, limits)


def parse_scenario(text: str, source: str = "<scenario>",
                   limits: HostLimits | None = None) -> Scenario:
    """Validate scenario text. Every problem is a ScenarioError of one line naming the source,
    the line and the dotted key; no other exception escapes, whatever the text holds."""
    try:
        _check_depth(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}:{_yaml_error_line(e, text)}: (yaml): not valid YAML: "
                            f"{_printable(_yaml_problem(e))}") from e
    if root is None:
        raise ScenarioError(f"{source}:1: (top): expected a mapping, got an empty document")
    return _Validator(source, limits or HostLimits.probe()).scenario(root)


def _check_depth(text: str, source: str) -> None:
    """Refuse deep nesting from the event stream (the parser keeps an explicit stack), before
    the recursive composer could run out of stack."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else 1
                raise ScenarioError(f"{source}:{line}: (yaml): nested deeper than {MAX_DEPTH} "
                                    "levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        return ": ".join(p for p in (e.context, e.problem) if p) or type(e).__name__
    if isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        return f"unacceptable character #x{code:04x}"
    return str(e) or type(e).__name__


def _yaml_error_line(e: yaml.YAMLError, text: str) -> int:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            return mark.line + 1
    if isinstance(e, yaml.reader.ReaderError):
        return text.count("\n", 0, e.position) + 1
    return 1


def _printable(text: str, limit: int = 200) -> str:
    """One line of printable text: control characters escaped, long text cut."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _show(value: Any) -> str:
    return _printable(repr(value), 80)


Node = yaml.Node
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class _Validator:
    def __init__(self, source: str, limits: HostLimits) -> None:
        self.source = source
        self.limits = limits

    def fail(self, node: Node, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}:{node.start_mark.line + 1}: "
                             f"{_printable(key or '(top)')}: "
                             f"{_printable(message, 400)}")

    def mapping(
        self,
        node: Node,
        key: str,
        fields: dict[str, Callable[[Node, str], Any]],
        required: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Validate a mapping: every key known, required ones present; returns parsed values."""
        if not isinstance(node, yaml.MappingNode) or node.tag != MAPPING_TAG:
            raise self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in SCALAR_TAGS:
                raise self.fail(key_node, key,
                                f"expected a plain key, got {_describe(key_node)}")
            name = key_node.value
            path = f"{key}.{name}" if key else name
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise self.fail(key_node, path, f"unknown key (expected one of: {known})")
            if name in values:
                raise self.fail(key_node, path, "duplicate key")
            values[name] = fields[name](value_node, path)
        for name in required:
            if name not in values:
                path = f"{key}.{name}" if key else name
                raise self.fail(node, path, "required key is missing")
        return values

    def scalar(self, node: Node, key: str, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in SCALAR_TAGS:
            raise self.fail(node, key, f"expected {what}, got {_describe(node)}")
        try:
            return _CONSTRUCTOR.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, KeyError) as e:
            # e.g. `!!int abc`, `!!bool maybe`, or an integer of more digits than Python converts
            raise self.fail(node, key, f"expected {what}, got {_printable(node.value, 40)!r}"
                                       f" ({type(e).__name__})") from e

    def integer(self, minimum: int, maximum: int, why: str = "") -> Callable[[Node, str], int]:
        what = f"an integer >= {minimum} and <= {maximum}{why}"

        def check(node: Node, key: str) -> int:
            value = self.scalar(node, key, what)
            bad = not isinstance(value, int) or isinstance(value, bool)
            if bad or not minimum <= value <= maximum:
                raise self.fail(node, key, f"expected {what}, got {_show(value)}")
            return value

        return check

    def number(self, minimum: float, maximum: float, *,
               strict: bool = False) -> Callable[[Node, str], float]:
        what = f"a finite number {'>' if strict else '>='} {minimum:g} and <= {maximum:g}"

        def check(node: Node, key: str) -> float:
            value = self.scalar(node, key, what)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                try:
                    value = float(value)
                except OverflowError:  # an integer beyond any float
                    ok = False
            if (not ok or not math.isfinite(value) or value < minimum
                    or (strict and value == minimum) or value > maximum):
                raise self.fail(node, key, f"expected {what}, got {_show(value)}")
            return value

        return check

    def choice(self, options: tuple[str, ...]) -> Callable[[Node, str], str]:
        def check(node: Node, key: str) -> str:
            value = self.scalar(node, key, f"one of {', '.join(options)}")
            if not isinstance(value, str) or value not in options:
                raise self.fail(node, key,
                                f"expected one of {', '.join(options)}, got {_show(value)}")
            return value

        return check

    def text(self, node: Node, key: str) -> str:
        value = self.scalar(node, key, "a string")
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
            raise self.fail(node, key, f"expected a non-empty string of at most {MAX_TEXT} "
                                       f"characters, got {_show(value)}")
        return value

    def name(self, node: Node, key: str) -> str:
        """The name becomes part of QEMU's -name and of the run folder's name: it must be that
        identifier already, checked here before anything is created."""
        value = self.scalar(node, key, "a name")
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise self.fail(node, key, "expected a name of 1-63 letters, digits, '_', '.' or "
                                       f"'-' starting with a letter or digit, got {_show(value)}")
        return value

    def window(self, node: Node, key: str) -> tuple[float, float]:
        what = "a list [lo, hi] of seconds with 0 <= lo <= hi"
        if (not isinstance(node, yaml.SequenceNode) or node.tag != SEQUENCE_TAG
                or len(node.value) != 2):
            raise self.fail(node, key, f"expected {what}, got {_describe(node)}")
        lo, hi = (self.number(0.0, MAX_SECONDS)(item, key) for item in node.value)
        if lo > hi:
            raise self.fail(node, key, f"expected {what}, got [{lo:g}, {hi:g}]")
        return (lo, hi)

    def scenario(self, root: Node) -> Scenario:
        v = self.mapping(
            root,
            "",
            {
                "name": self.name,
                "description": self.text,
                "seed": self.integer(0, 2**64 - 1),
                "vm": self.vm,
                "target": self.target,
                "workload": self.workload,
                "cuts": self.cuts,
                "timeouts": self.timeouts,
            },
            required=("name", "seed", "target", "workload", "cuts"),
        )
        scenario = Scenario(**v)
        self.check_fits(root, scenario)
        self.check_cut_kind(root, scenario)
        problem = make_target(scenario.target).snapshot_problem()
        if problem and scenario.cuts.restart == "snapshot":
            cuts = _child(root, "cuts")
            raise self.fail(_child(cuts, "restart") if cuts is not root else root, "cuts.restart",
                            f"snapshot cannot be restored safely here: {problem} "
                            f"(use restart: cold or reset)")
        return scenario

    def vm(self, node: Node, key: str) -> VmSpec:
        v = self.mapping(
            node,
            key,
            {
                "memory_mib": self.integer(128, min(MAX_MEMORY_MIB, self.limits.memory_mib),
                                           " (this host's memory)"),
                "smp": self.integer(1, self.limits.smp, " (this host's cores)"),
                "accel": self.choice(ACCELS),
                "nvdimm": self.nvdimm,
            },
        )
        return VmSpec(**v)

    def nvdimm(self, node: Node, key: str) -> NvdimmSize:
        v = self.mapping(
            node, key,
            {"size_mib": self.integer(MIN_NVDIMM_MIB, max(MIN_NVDIMM_MIB, self.limits.nvdimm_mib),
                                      " (half the free disk space of the temp folder)"),
             "label_kib": self.integer(128, MAX_LABEL_KIB)},
        )
        size = v.get("size_mib")
        if size is not None and size % 16:
            # The region must be a multiple of its 16 MiB alignment or ndctl cannot carve it.
            item = _child(node, "size_mib")
            raise self.fail(item, f"{key}.size_mib", f"expected a multiple of 16, got {size}")
        return NvdimmSize(**v)

    def target(self, node: Node, key: str) -> TargetSpec:
        """Generic types here; which keys a kind takes and their rules are its driver's."""
        all_namespaces = tuple(dict.fromkeys(ns for kind in TARGETS for ns in namespaces_of(kind)))
        v = self.mapping(
            node,
            key,
            {
                "kind": self.choice(tuple(TARGETS)),
                "namespace": self.choice(all_namespaces),
                "bsize": self.integer(512, MAX_BSIZE),
                "pool_mib": self.integer(MIN_NVDIMM_MIB, MAX_NVDIMM_MIB),
                "client": self.choice(tuple(CLIENTS)),
                "persistence": self.choice(PERSISTENCE_MODELS),
            },
            required=("kind", "bsize"),
        )
        kind, bsize = v["kind"], v["bsize"]
        if bsize & (bsize - 1):
            raise self.fail(
                _child(node, "bsize"), f"{key}.bsize", f"expected a power of two, got {bsize}"
            )
        choices = namespaces_of(kind)
        if "namespace" in v and v["namespace"] not in choices:
            with_choice = [k for k in TARGETS if namespaces_of(k)]
            valid = (f"expected one of {', '.join(choices)}" if choices
                     else f"only valid for kind {', '.join(with_choice)}")
            raise self.fail(_child(node, "namespace"), f"{key}.namespace", valid)
        if choices:
            v.setdefault("namespace", choices[0])
        driver = driver_class(kind, v.get("namespace"))
        for name in ("pool_mib", "client", "persistence"):
            if name in v and name not in driver.optional_keys:
                users = sorted({f"{c.kind}" + (f" on {c.namespace}" if c.namespace else "")
                                for by_ns in TARGETS.values() for c in by_ns.values()
                                if name in c.optional_keys})
                raise self.fail(_child(node, name), f"{key}.{name}",
                                f"only valid for {', '.join(users)}")
        spec = TargetSpec(**v)
        problem = driver.check(spec)
        if problem:
            name, message = problem
            raise self.fail(_child(node, name), f"{key}.{name}", message)
        return spec

    def workload(self, node: Node, key: str) -> WorkloadSpec:
        v = self.mapping(
            node,
            key,
            {
                "threads": self.integer(1, MAX_THREADS),
                "lbas": self.integer(1, 1 << 32),  # and within the target's capacity
                "mix": self.mix,
                "ops": self.integer(1, MAX_OPS),
                "duration_s": self.number(0.0, MAX_SECONDS, strict=True),
            },
            required=("threads", "lbas", "mix"),
        )
        if ("ops" in v) == ("duration_s" in v):
            raise self.fail(
                node, f"{key}.ops", "give exactly one of ops (per thread) or duration_s"
            )
        return WorkloadSpec(**v)

    def mix(self, node: Node, key: str) -> MixSpec:
        weight = self.number(0.0, MAX_WEIGHT)
        v = self.mapping(node, key, {"read": weight, "write": weight, "zero": weight})
        if not any(v.values()):
            raise self.fail(node, key, "expected at least one positive weight of read, write, zero")
        return MixSpec(**v)

    def cuts(self, node: Node, key: str) -> CutsSpec:
        v = self.mapping(
            node,
            key,
            {
                "count": self.integer(1, MAX_CUTS),
                "restart": self.choice(tuple(RESTARTS)),
                "when": self.when,
                "on_unrecoverable": self.choice(ON_UNRECOVERABLE),
                "during": self.choice(DURING),
            },
            required=("count", "when"),
        )
        return CutsSpec(**v)

    def when(self, node: Node, key: str) -> CutWhen:
        v = self.mapping(node, key, {"after_s": self.window,
                                     "after_acks": self.integer(1, MAX_ACKS),
                                     "at_step": self.at_step})
        if len(v) != 1:
            raise self.fail(node, key, "give exactly one of after_s: [lo, hi], after_acks: N "
                                       "or at_step: {label, thread, nth}")
        return CutWhen(**v)

    def at_step(self, node: Node, key: str) -> StepSpec:
        labels = (RANDOM_LABEL, *WRITE_LABELS, *READ_LABELS, *CREATE_LABELS)
        v = self.mapping(node, key, {"label": self.choice(labels), "thread": self.thread,
                                     "nth": self.nth}, required=("label",))
        return StepSpec(**v)

    def thread(self, node: Node, key: str) -> int | None:
        what = f"any or a thread index >= 0 and < {MAX_THREADS}"
        value = self.scalar(node, key, what)
        if value == "any":
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_THREADS:
            raise self.fail(node, key, f"expected {what}, got {_show(value)}")
        return value

    def nth(self, node: Node, key: str) -> tuple[int, int]:
        """N (the Nth arrival) or [lo, hi]: drawn per cut."""
        count = self.integer(1, MAX_OPS)
        if isinstance(node, yaml.ScalarNode):
            n = count(node, key)
            return (n, n)
        what = f"an integer >= 1 or a list [lo, hi] of them with lo <= hi <= {MAX_OPS}"
        if (not isinstance(node, yaml.SequenceNode) or node.tag != SEQUENCE_TAG
                or len(node.value) != 2):
            raise self.fail(node, key, f"expected {what}, got {_describe(node)}")
        lo, hi = (count(item, key) for item in node.value)
        if lo > hi:
            raise self.fail(node, key, f"expected {what}, got [{lo}, {hi}]")
        return (lo, hi)

    def timeouts(self, node: Node, key: str) -> TimeoutsSpec:
        positive = self.number(0.0, MAX_SECONDS, strict=True)
        v = self.mapping(
            node, key, {"boot_s": positive, "workload_s": positive, "recover_s": positive}
        )
        return TimeoutsSpec(**v)

    def check_fits(self, root: Node, s: Scenario) -> None:
        """The working set must fit the target; caught here rather than minutes into a run."""
        region = s.vm.nvdimm.size_mib * MIB
        pool_mib = s.target.pool_mib
        if pool_mib is not None and pool_mib * MIB > region:
            raise self.fail(
                _child(_child(root, "target"), "pool_mib"),
                "target.pool_mib",
                f"pool ({pool_mib} MiB) is larger than vm.nvdimm.size_mib ({s.vm.nvdimm.size_mib})",
            )
        capacity = make_target(s.target).capacity(region)
        if s.workload.lbas > capacity:
            raise self.fail(
                _child(_child(root, "workload"), "lbas"),
                "workload.lbas",
                f"working set of {s.workload.lbas} blocks exceeds the target's {capacity}",
            )


    def check_cut_kind(self, root: Node, s: Scenario) -> None:
        """Cuts at a step and cuts during create need the BTT8 core in the agent; the step must
        be one the rounds reach, by a thread that exists."""
        cuts = _child(root, "cuts")
        when, step = _child(cuts, "when"), s.cuts.when.at_step
        btt8 = s.target.kind == "btt8"
        if s.cuts.during == "create":
            if not btt8:
                raise self.fail(_child(cuts, "during"), "cuts.during",
                                f"create cuts format a btt8 target, not {s.target.kind}")
            if s.cuts.when.after_acks is not None:
                raise self.fail(_child(when, "after_acks"), "cuts.when.after_acks",
                                "a create acknowledges no writes: use after_s or at_step")
        if step is None:
            return
        at = _child(when, "at_step")
        if not btt8:
            raise self.fail(at, "cuts.when.at_step",
                            f"steps are btt8's (btt8.steps), not {s.target.kind}'s")
        if step.label != RANDOM_LABEL and step.label not in s.step_labels():
            where = ("a create (cuts.during: create)" if s.cuts.during == "create"
                     else "this workload.mix")
            raise self.fail(_child(at, "label"), "cuts.when.at_step.label",
                            f"{step.label} is never reached by {where}; it reaches: "
                            f"{', '.join(s.step_labels())}")
        if s.cuts.during == "create" and step.nth[1] > 1:
            raise self.fail(_child(at, "nth"), "cuts.when.at_step.nth",
                            "a create passes each of its steps once: nth must be 1")
        threads = 1 if s.cuts.during == "create" else s.workload.threads
        if step.thread is not None and step.thread >= threads:
            raise self.fail(_child(at, "thread"), "cuts.when.at_step.thread",
                            f"thread {step.thread} does not exist: the round runs {threads}")


def _child(node: Node, name: str) -> Node:
    for key_node, value_node in node.value:
        if key_node.value == name:
            return value_node
    return node


def _describe(node: Node) -> str:
    standard = node.tag in SCALAR_TAGS or node.tag in (MAPPING_TAG, SEQUENCE_TAG)
    shown = node.tag.replace("tag:yaml.org,2002:", "!!")
    tag = "" if standard else f" tagged {_printable(shown, 60)}"
    if isinstance(node, yaml.MappingNode):
        return "a mapping" + tag
    if isinstance(node, yaml.SequenceNode):
        return "a list" + tag
    return _show(node.value) + tag
