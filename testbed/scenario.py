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

TARGET_KINDS = ("btt8", "kernel-btt", "raw-pmem")
NAMESPACES = ("devdax", "fsdax")
ACCELS = ("auto", "kvm", "tcg")
CUT_MODES = ("quit", "reset")
# The Linux BTT only offers these sector sizes for 512/4096-byte logical blocks; a workload
# block bigger than one sector would legitimately tear on kernel-btt.
KERNEL_BTT_BSIZES = (512, 4096)
BTT8_MIN_POOL_MIB = 16
BTT8_NFREE = 4096
MIB = 1 << 20


class ScenarioError(ValueError):
    """A scenario file that does not match the schema; the message names file:line: key."""


@dataclass(frozen=True)
class NvdimmSpec:
    size_mib: int = 512
    label_kib: int = 128


@dataclass(frozen=True)
class VmSpec:
    memory_mib: int = 1024
    smp: int = 2
    accel: str = "auto"
    nvdimm: NvdimmSpec = NvdimmSpec()


@dataclass(frozen=True)
class TargetSpec:
    kind: str
    bsize: int
    namespace: str | None = None  # btt8 only: devdax (pool on /dev/daxN.M) or fsdax (pool file)
    pool_mib: int | None = None  # btt8 pool size; None on devdax = the whole device


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
    mode: str = "quit"


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

    def agent_target(self, path: str) -> dict[str, Any]:
        """The agent's `target` object for the device or pool file at `path` in the guest."""
        target: dict[str, Any] = {
            "kind": self.target.kind,
            "path": path,
            "bsize": self.target.bsize,
        }
        if self.target.pool_mib is not None:
            target["pool_mib"] = self.target.pool_mib
        return target

    def workload_config(
        self, path: str, events: str, epoch: int, resume: list[int] | None = None
    ) -> dict[str, Any]:
        """Stdin of `python3 -m tbagent workload` for cut round `epoch` (the cut number)."""
        w = self.workload
        config: dict[str, Any] = {
            "target": self.agent_target(path),
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

    def nvdimm(self, node: Node, key: str) -> NvdimmSpec:
        v = self.mapping(
            node, key, {"size_mib": self.integer(BTT8_MIN_POOL_MIB), "label_kib": self.integer(128)}
        )
        size = v.get("size_mib")
        if size is not None and size % 16:
            # The region must be a multiple of its 16 MiB alignment or ndctl cannot carve it.
            item = _child(node, "size_mib")
            raise self.fail(item, f"{key}.size_mib", f"expected a multiple of 16, got {size}")
        return NvdimmSpec(**v)

    def target(self, node: Node, key: str) -> TargetSpec:
        v = self.mapping(
            node,
            key,
            {
                "kind": self.choice(TARGET_KINDS),
                "namespace": self.choice(NAMESPACES),
                "bsize": self.integer(512),
                "pool_mib": self.integer(BTT8_MIN_POOL_MIB),
            },
            required=("kind", "bsize"),
        )
        kind, bsize = v["kind"], v["bsize"]
        if bsize & (bsize - 1):
            raise self.fail(
                _child(node, "bsize"), f"{key}.bsize", f"expected a power of two, got {bsize}"
            )
        if kind == "kernel-btt" and bsize not in KERNEL_BTT_BSIZES:
            raise self.fail(
                _child(node, "bsize"),
                f"{key}.bsize",
                f"kernel-btt sectors are 512 or 4096, got {bsize}",
            )
        if kind != "btt8":
            for name in ("namespace", "pool_mib"):
                if name in v:
                    raise self.fail(_child(node, name), f"{key}.{name}", "only valid for kind btt8")
            return TargetSpec(**v)
        v.setdefault("namespace", "devdax")
        if v["namespace"] == "fsdax" and "pool_mib" not in v:
            raise self.fail(
                node, f"{key}.pool_mib", "required key is missing (fsdax pool file size)"
            )
        return TargetSpec(**v)

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
            {"count": self.integer(1), "mode": self.choice(CUT_MODES), "when": self.when},
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
        target_node = _child(root, "target")
        pool_mib = s.target.pool_mib
        if pool_mib is not None and pool_mib > s.vm.nvdimm.size_mib:
            raise self.fail(
                _child(target_node, "pool_mib"),
                "target.pool_mib",
                f"pool ({pool_mib} MiB) is larger than vm.nvdimm.size_mib ({s.vm.nvdimm.size_mib})",
            )
        size = (pool_mib or s.vm.nvdimm.size_mib) * MIB
        capacity = (
            btt8_nblocks(size, s.target.bsize)
            if s.target.kind == "btt8"
            else size // s.target.bsize
        )
        if s.workload.lbas > capacity:
            raise self.fail(
                _child(_child(root, "workload"), "lbas"),
                "workload.lbas",
                f"working set of {s.workload.lbas} blocks exceeds the target's {capacity}",
            )


def btt8_nblocks(pool_bytes: int, bsize: int) -> int:
    """Usable LBAs of a BTT8 pool (the sizing rule from DESIGN.md); <= 0 means too small."""
    k = pool_bytes // bsize - 1
    data = k * bsize // (bsize + 16)
    return data - BTT8_NFREE


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
