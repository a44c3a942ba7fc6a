"""Scenario files: a YAML campaign, validated against a fixed schema into frozen dataclasses.

Validation walks the composed YAML node tree (not the loaded dict) so every error can name the
file, the line and the dotted key: `scenarios/x.yaml:12: workload.threads: expected ...`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.restart import RESTARTS
from testbed.targets import TARGETS, TargetSpec, driver_class, make_target, namespaces_of

ACCELS = ("auto", "kvm", "tcg")
ON_UNRECOVERABLE = ("stop", "reformat")
MIN_NVDIMM_MIB = 16  # one region alignment unit
MIB = 1 << 20


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
class CutWhen:
    after_s: tuple[float, float] | None = None  # seeded-random delay after the workload starts
    after_acks: int | None = None  # cut once this many writes are acknowledged


@dataclass(frozen=True)
class CutsSpec:
    count: int
    when: CutWhen
    mode: str = "quit"  # a restart strategy (testbed.restart.RESTARTS)
    on_unrecoverable: str = "stop"  # or reformat the target and go on


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


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from e
    return parse_scenario(text, str(path))


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ScenarioError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if root is None:
        raise ScenarioError(f"{source}:1: (top): expected a mapping, got an empty document")
    return _Validator(source).scenario(root)


Node = yaml.Node
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: Node, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}:{node.start_mark.line + 1}: {key}: {message}")

    def mapping(
        self,
        node: Node,
        key: str,
        fields: dict[str, Callable[[Node, str], Any]],
        required: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Validate a mapping: every key known, required ones present; returns parsed values."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
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
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected {what}, got {_describe(node)}")
        return _CONSTRUCTOR.construct_object(node)

    def integer(self, minimum: int, maximum: int | None = None) -> Callable[[Node, str], int]:
        what = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum else "")

        def check(node: Node, key: str) -> int:
            value = self.scalar(node, key, what)
            bad = not isinstance(value, int) or isinstance(value, bool) or value < minimum
            if bad or (maximum is not None and value > maximum):
                raise self.fail(node, key, f"expected {what}, got {value!r}")
            return value

        return check

    def number(self, minimum: float, *, strict: bool = False) -> Callable[[Node, str], float]:
        what = f"a number {'>' if strict else '>='} {minimum:g}"

        def check(node: Node, key: str) -> float:
            value = self.scalar(node, key, what)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or value < minimum or (strict and value == minimum):
                raise self.fail(node, key, f"expected {what}, got {value!r}")
            return float(value)

        return check

    def choice(self, options: tuple[str, ...]) -> Callable[[Node, str], str]:
        def check(node: Node, key: str) -> str:
            value = self.scalar(node, key, f"one of {', '.join(options)}")
            if value not in options:
                raise self.fail(node, key, f"expected one of {', '.join(options)}, got {value!r}")
            return value

        return check

    def text(self, node: Node, key: str) -> str:
        value = self.scalar(node, key, "a string")
        if not isinstance(value, str) or not value:
            raise self.fail(node, key, f"expected a non-empty string, got {value!r}")
        return value

    def window(self, node: Node, key: str) -> tuple[float, float]:
        what = "a list [lo, hi] of seconds with 0 <= lo <= hi"
        if not isinstance(node, yaml.SequenceNode) or len(node.value) != 2:
            raise self.fail(node, key, f"expected {what}, got {_describe(node)}")
        lo, hi = (self.number(0.0)(item, key) for item in node.value)
        if lo > hi:
            raise self.fail(node, key, f"expected {what}, got [{lo:g}, {hi:g}]")
        return (lo, hi)

    def scenario(self, root: Node) -> Scenario:
        v = self.mapping(
            root,
            "",
            {
                "name": self.text,
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
        return scenario

    def vm(self, node: Node, key: str) -> VmSpec:
        v = self.mapping(
            node,
            key,
            {
                "memory_mib": self.integer(128),
                "smp": self.integer(1),
                "accel": self.choice(ACCELS),
                "nvdimm": self.nvdimm,
            },
        )
        return VmSpec(**v)

    def nvdimm(self, node: Node, key: str) -> NvdimmSize:
        v = self.mapping(
            node, key, {"size_mib": self.integer(MIN_NVDIMM_MIB), "label_kib": self.integer(128)}
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
                "bsize": self.integer(512),
                "pool_mib": self.integer(MIN_NVDIMM_MIB),
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
        for name in ("pool_mib",):
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
                "threads": self.integer(1),
                "lbas": self.integer(1),
                "mix": self.mix,
                "ops": self.integer(1),
                "duration_s": self.number(0.0, strict=True),
            },
            required=("threads", "lbas", "mix"),
        )
        if ("ops" in v) == ("duration_s" in v):
            raise self.fail(
                node, f"{key}.ops", "give exactly one of ops (per thread) or duration_s"
            )
        return WorkloadSpec(**v)

    def mix(self, node: Node, key: str) -> MixSpec:
        weight = self.number(0.0)
        v = self.mapping(node, key, {"read": weight, "write": weight, "zero": weight})
        if not any(v.values()):
            raise self.fail(node, key, "expected at least one positive weight of read, write, zero")
        return MixSpec(**v)

    def cuts(self, node: Node, key: str) -> CutsSpec:
        v = self.mapping(
            node,
            key,
            {
                "count": self.integer(1),
                "mode": self.choice(tuple(RESTARTS)),
                "when": self.when,
                "on_unrecoverable": self.choice(ON_UNRECOVERABLE),
            },
            required=("count", "when"),
        )
        return CutsSpec(**v)

    def when(self, node: Node, key: str) -> CutWhen:
        v = self.mapping(node, key, {"after_s": self.window, "after_acks": self.integer(1)})
        if len(v) != 1:
            raise self.fail(node, key, "give exactly one of after_s: [lo, hi] or after_acks: N")
        return CutWhen(**v)

    def timeouts(self, node: Node, key: str) -> TimeoutsSpec:
        positive = self.number(0.0, strict=True)
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


def _child(node: Node, name: str) -> Node:
    for key_node, value_node in node.value:
        if key_node.value == name:
            return value_node
    return node


def _describe(node: Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)
