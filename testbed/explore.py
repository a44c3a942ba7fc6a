"""`testbed explore`: model-check the real BTT8 code (btt8.steps) against ADR crash states, on
the host, no VM.

Threads. Each of --threads threads runs --ops operations, the agent's deterministic op
sequence (tbagent.payload.op_at: writes of self-describing blocks and reads, on --lbas LBAs,
from --seed), as btt8.steps generators; a scheduler picks who runs the next PlusCal step.
Schedules are enumerated depth-first, stateless (each one re-executed from the pristine pool):
every schedule with at most --preemptions preemptions (switching away from a thread that could
go on), up to --max-interleavings; if the bounded space is exhausted first, seeded random
schedules fill the rest. --exhaustive: the bounded space only, to its end, no random tail;
summary.json's `complete` says whether every schedule and every crash state was covered.

Memory. The pool runs on a tracing backend (TracePmem): loads come from a DRAM copy, every
store dirties 64-byte lines and records the line's new content (a version), a persist writes
its lines through to the media image. The pristine image is formatted once; a schedule restores
only the lines the previous one touched, and opens a Pool on it (~1 ms). At every step boundary
of every schedule (a crash point) the crash states are: for each dirty line, which of its
versions since its last persist reached the media, none included (x86 write-back: a line is
written back whole, with whatever content it had when evicted; 8-byte stores are atomic).

Reduction (after Jaaru, ASPLOS 2021: branch only on what the post-crash execution reads).
Instead of the product over all dirty lines, recovery is run and only the lines it reads are
branched on:
  1. the dirty lines of the translation table (what BTT8's open reads to build the map; in
     practice the 1-3 entries in flight): every combination of their versions (sampled beyond
     _TABLE_STATES_CAP combinations, and then `complete` is false);
  2. for each, open (recovery) runs once and gives each LBA's block; every combination of
     versions of the dirty lines of each mapped block is accounted for, without building them
     all: the distinct decoded values are worked out from the header line's versions (see
     _block_variants), and the oracle judges one combination per value;
  3. dirty lines nothing reads after the crash (free blocks, lines no LBA maps) are never
     branched on: no combination of them changes what recovery or a read returns. Identical
     images (same media content, same table versions) are recovered once (`distinct_images`).
The per-LBA oracle judges each LBA on its own, so the cross product of the LBAs' block variants
(counted in `states`) needs only max(variants) oracle calls, the k-th variant of every LBA in
the k-th call.
What it may miss: a line torn below 64 bytes inside one step's memcpy (a step's stores are one
unit, a multi-line store split only at line boundaries); crashes inside a step; anything only a
schedule beyond the preemption bound or the interleaving cap shows (depth-first order varies
the last operations first: with --ops 200 and the default cap, only the interleavings of the
last few operations are tried, and the seed's cycle-shift, found at interleaving 187 of the
3-operation space, goes unseen); lines read only by operations after recovery (the judge reads
each LBA once; no post-crash write runs, no second crash); table crash states beyond the cap
in 1. (then `complete` is false). Recovery itself writes nothing, so it has no crash points.

Judging: testbed.oracle.judge, the per-LBA linearizability oracle power-cut runs use, on the
history the agent would have reported (an invoke when a thread starts an op, an ok when it
returns: acks are the operations that returned before the crash point; a read's ok carries the
value it returned) and a recovery dump of every LBA (decoded block, or `ok: false` when open
fails). So a read that returned a value the crash then lost is judged too (read-reverted).

Each violation kind keeps its shortest reproduction (fewest steps before the crash point):
the schedule, the crash state (which version of each dirty line reached the media) and the
verdict, in results/<run-id>/violation-N.json; `testbed explore --replay FILE` re-runs exactly
that and exits 1 if it reproduces.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from btt8.core import ENTRY_SIZE, FLAG_ZERO, PBA_MASK, Layout, Pool, format_pool
from btt8.pmem import LINE, Pmem
from btt8.steps import read_steps, write_steps
from tbagent.payload import MAGIC, WriteId, decode_block, make_block, op_at

from testbed import oracle

MIB = 1 << 20
_PAYLOAD_HEAD = struct.Struct("<8sQQIIQI")  # tbagent.payload's block header, up to bsize
MIX = {"read": 1.0, "write": 2.0}
EPOCH = 0
_TABLE_STATES_CAP = 1024
_EXAMPLE_LINES = 64

Chooser = Callable[[list[int], int, int, int], int]  # (runnable, current, used, depth) -> thread


class TracePmem(Pmem):
    """DRAM copy + media image; stores dirty lines (keeping each version since the line's last
    persist), persist writes them through. Owns neither buffer: reset() restores the lines
    touched since the last reset from the pristine image."""

    persist_mode = "trace"

    def __init__(self, dram: bytearray, media: bytearray) -> None:
        super().__init__(dram)
        self.media = media
        self.versions: dict[int, list[bytes]] = {}  # dirty line -> contents since its persist
        self.touched: set[int] = set()
        self.stores = self.persists = self.fences = 0
        self.media_key = 0  # XOR of hash(line, content) over written-through lines: O(1) each
        # line -> a number that changes whenever its content or versions do (never reused, not
        # even across resets): (line, stamp) pairs name a line's state, for caches
        self.stamp: dict[int, int] = {}
        self._seq = 0

        def store8(word: int, value: int) -> None:
            self.visible_words[word] = value
            self._stored(word * 8, 8)

        self.store8 = store8

    def _changed(self, line: int) -> None:
        self._seq += 1
        self.stamp[line] = self._seq

    def reset(self, base: bytes) -> None:
        for line in self.touched:
            s = line * LINE
            self._buf[s : s + LINE] = self.media[s : s + LINE] = base[s : s + LINE]
            self._changed(line)
        self.touched.clear()
        self.versions.clear()
        self.stores = self.persists = self.fences = self.media_key = 0

    @property
    def atomic_swap(self) -> bool:
        return True

    def _stored(self, off: int, n: int) -> None:
        self.stores += 1
        for line in range(off // LINE, (off + n + LINE - 1) // LINE):
            self.touched.add(line)
            self.versions.setdefault(line, []).append(self.line(line))
            self._changed(line)

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        self._stored(off, len(data))

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.store(off, data)
        self.persist(off, len(data))

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        if super().cas16(word, old_lo, old_hi, new_lo, new_hi):
            self._stored(word * 8, 16)
            return True
        return False

    def persist(self, off: int, n: int) -> None:
        self.persists += 1
        for line in range(off // LINE, (off + n + LINE - 1) // LINE):
            if self.versions.pop(line, None) is not None:
                s = line * LINE
                old, new = bytes(self.media[s : s + LINE]), self.line(line)
                self.media_key ^= hash((line, old)) ^ hash((line, new))
                self.media[s : s + LINE] = new
                self._changed(line)

    def fence(self) -> None:
        self.fences += 1

    def close(self) -> None:
        """The explorer owns the buffers and reuses them: nothing to release."""

    def line(self, line: int) -> bytes:
        return bytes(self._buf[line * LINE : (line + 1) * LINE])

    def media_line(self, line: int) -> bytes:
        return bytes(self.media[line * LINE : (line + 1) * LINE])


class _ImagePmem(Pmem):
    """A Pmem over an existing bytearray (no copy): recovery reads the crash image in place."""

    persist_mode = "image"

    def persist(self, off: int, n: int) -> None:
        pass


@dataclass
class Stats:
    states: int = 0
    judged: int = 0  # oracle verdicts computed (the rest were cache hits)
    crash_points: int = 0
    interleavings: int = 0
    distinct_images: int = 0
    stores: int = 0
    persists: int = 0
    fences: int = 0
    schedules_exhausted: bool = False
    sampled_crash_points: int = 0  # crash points whose states were sampled, not enumerated
    violations: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_violation: dict[str, Any] | None = None  # when (s, interleaving) the first was found
    shortest: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> reproduction


@dataclass
class _Schedule:
    """The state of one schedule being executed: its pool, history and steps so far."""

    pmem: TracePmem
    events: list[dict[str, Any]] = field(default_factory=list)
    history_key: int = 0  # a hash chain over events: equal histories share oracle verdicts
    steps: list[dict[str, Any]] = field(default_factory=list)  # thread, op, label per step
    clock: int = 0

    def emit(self, event: dict[str, Any]) -> None:
        self.clock += 1
        event = {**event, "t": self.clock, "epoch": EPOCH}
        self.events.append(event)
        self.history_key = hash((self.history_key, json.dumps(event, sort_keys=True)))


class Explorer:
    def __init__(self, *, pool_mib: int = 16, bsize: int = 512, threads: int = 2, ops: int = 3,
                 lbas: int = 1, seed: int = 0, preemptions: int = 2,
                 max_interleavings: int | None = 200, exhaustive: bool = False,
                 fault: str = "") -> None:
        self.bsize, self.threads, self.ops, self.lbas = bsize, threads, ops, lbas
        self.seed, self.preemptions = seed, preemptions
        self.exhaustive, self.max_interleavings = exhaustive, max_interleavings
        self.fault = fault  # TEST ONLY: a btt8 test fault (Pool._inject_test_fault)
        media = bytearray(pool_mib * MIB)
        self.layout = Layout.for_pool(bsize, len(media))
        if lbas > self.layout.nblocks:
            raise ValueError(f"--lbas {lbas}: the pool has {self.layout.nblocks} blocks")
        fmt = _ImagePmem(media)
        format_pool(fmt, self.layout)
        fmt.close()
        self.base = bytes(media)
        self.pmem = TracePmem(bytearray(media), media)
        self.workload = {"seed": seed, "epoch": EPOCH, "threads": threads, "lbas": lbas,
                         "mix": MIX, "resume": [0] * threads, "ops": ops}
        self.plan = [[op_at(seed, t, i, lbas, MIX) for i in range(ops)] for t in range(threads)]
        lay = self.layout
        self.table_lines = range(lay.ttoff // LINE, (lay.ttoff + lay.nblocks * ENTRY_SIZE
                                                     + LINE - 1) // LINE)
        self.stats = Stats()
        self._recovered: dict[bytes, list[int] | str] = {}
        self._decoded: dict[tuple[int, bytes], oracle.Decoded] = {}
        self._named: dict[bytes, bytes | None] = {}
        self._variants: dict[tuple[int, ...], tuple[list[Any], int]] = {}
        self._verdicts: dict[tuple[int, tuple[Any, ...]], oracle.Verdict] = {}

    # -- one schedule -------------------------------------------------------------------------

    def _run(self, choose: Chooser, crash_at: int | None = None) -> _Schedule:
        """Execute one schedule from the pristine pool; every step boundary is a crash point
        (only the one after `crash_at` steps, when given: the schedule stops there)."""
        pmem = self.pmem
        pmem.reset(self.base)
        self._variants.clear()  # the reset gave every touched line a new stamp
        pool = Pool(pmem)
        if self.fault:
            pool._inject_test_fault(self.fault)
        run = _Schedule(pmem)
        run.emit({"ev": "start"})
        current_op = [0] * self.threads

        def thread_body(t: int) -> Generator[str, None, None]:
            buf = bytearray(self.bsize)
            for i, (kind, lba) in enumerate(self.plan[t]):
                current_op[t] = i
                op = {"thread": t, "op": i, "kind": kind, "lba": lba}
                run.emit({"ev": "invoke", **op})
                if kind == "write":
                    block = make_block(self.seed, lba, WriteId(EPOCH, t, i), self.bsize)
                    yield from write_steps(pool, lba, block)
                    run.emit({"ev": "ok", **op})
                else:
                    yield from read_steps(pool, lba, buf)
                    value = decode_block(buf, self.seed, lba)
                    run.emit({"ev": "ok", **op, "value": value.to_json()})

        gens = [thread_body(t) for t in range(self.threads)]
        pending = [next(g, None) for g in gens]
        current, used = -1, 0
        if crash_at is None:
            self._crash_point(run)
        while crash_at is None or len(run.steps) < crash_at:
            runnable = [t for t in range(self.threads) if pending[t] is not None]
            if not runnable:
                break
            t = choose(runnable, current, used, len(run.steps))
            if current in runnable and t != current:
                used += 1
            current = t
            run.steps.append({"thread": t, "op": current_op[t], "label": pending[t]})
            pending[t] = next(gens[t], None)
            if crash_at is None:
                self._crash_point(run)
        s = self.stats
        s.stores += pmem.stores
        s.persists += pmem.persists
        s.fences += pmem.fences
        return run

    # -- crash states -------------------------------------------------------------------------

    def _line_states(self, lines: list[int], cap: int,
                     rng_seed: int) -> tuple[list[tuple[int, ...]], bool]:
        """Version choices (0 = the media's content, k = the k-th version since the last
        persist) for each line: all combinations, or a seeded sample beyond cap (False)."""
        counts = [len(self.pmem.versions[ln]) + 1 for ln in lines]
        total = 1
        for n in counts:
            total *= n
        if total <= cap:
            return list(product(*(range(n) for n in counts))), True
        rng = random.Random(rng_seed)
        sample = {tuple(n - 1 for n in counts), tuple(0 for _ in counts)}
        while len(sample) < cap:
            sample.add(tuple(rng.randrange(n) for n in counts))
        return sorted(sample), False

    def _content(self, line: int, version: int) -> bytes:
        return (self.pmem.media_line(line) if version == 0
                else self.pmem.versions[line][version - 1])

    def _crash_point(self, run: _Schedule) -> None:
        s, pmem = self.stats, self.pmem
        s.crash_points += 1
        table_dirty = sorted(ln for ln in pmem.versions if ln in self.table_lines)
        table_states, complete = self._line_states(table_dirty, _TABLE_STATES_CAP,
                                                   len(run.steps))
        sampled = not complete
        media_key = pmem.media_key.to_bytes(8, "little", signed=True)
        for choice in table_states:
            table_state = {ln: k for ln, k in zip(table_dirty, choice, strict=True)}
            lines = {ln: self._content(ln, k) for ln, k in table_state.items() if k}
            key = media_key + b"".join(ln.to_bytes(8, "little") + c for ln, c in lines.items())
            mapping = self._recovered.get(key)
            if mapping is None:
                mapping = self._recover(lines)
                self._recovered[key] = mapping
                s.distinct_images += 1
            if isinstance(mapping, str):
                s.states += 1
                self._judge(run, {"ok": False, "error": mapping}, (mapping,), table_state)
                continue
            variants = []
            n_states = 1
            for lba, pba in enumerate(mapping):
                lba_variants, n = self._block_variants(lba, pba)
                variants.append(lba_variants)
                n_states *= n
            s.states += n_states
            for k in range(max(len(v) for v in variants)):
                picked = [v[min(k, len(v) - 1)] for v in variants]
                crash_state = dict(table_state)
                for _, block_state in picked:
                    crash_state.update(block_state)
                recovery = {"ok": True, "blocks": {str(lba): value.to_json()
                                                   for lba, (value, _) in enumerate(picked)}}
                self._judge(run, recovery, tuple(value for value, _ in picked), crash_state)
        s.sampled_crash_points += sampled

    def _recover(self, lines: dict[int, bytes]) -> list[int] | str:
        """Open (recovery) on the media with `lines` written over it: each LBA's PBA word, or
        what open raised."""
        media = self.pmem.media
        saved = {ln: self.pmem.media_line(ln) for ln in lines}
        for ln, content in lines.items():
            media[ln * LINE : (ln + 1) * LINE] = content
        try:
            pool = Pool(_ImagePmem(media))
            try:
                return list(pool._pbas[: self.lbas])
            finally:
                pool.close()
        except Exception as e:  # whatever recovery raises is the evidence
            return f"{type(e).__name__}: {e}"
        finally:
            for ln, content in saved.items():
                media[ln * LINE : (ln + 1) * LINE] = content

    def _block_variants(self, lba: int, pba: int
                        ) -> tuple[list[tuple[oracle.Decoded, dict[int, int]]], int]:
        """The distinct decoded values of `lba`'s block over every version choice of its
        dirty lines, each with one choice that gives it; and the number of choices.

        Not by building every combination (v^8 for a 512-byte block): a block decodes as a
        write (or zero, or phantom) only if it is exactly that write's block, which its header
        line names, so the candidates are the all-zero block and the block each version of the
        header line names; a candidate is reachable iff each line has its content among its
        versions; every other combination is torn, and one of them is judged."""
        if pba & FLAG_ZERO:
            return [(oracle.ZERO, {})], 1
        bsize = self.bsize
        off = self.layout.dataoff + (pba & PBA_MASK) * bsize
        first, end = off // LINE, (off + bsize) // LINE
        stamp = self.pmem.stamp
        key = (lba, first, *(stamp.get(ln, 0) for ln in range(first, end)))
        cached = self._variants.get(key)
        if cached is None:
            cached = self._variants[key] = self._block_variants_now(lba, first, end)
        return cached

    def _block_variants_now(self, lba: int, first: int, end: int
                            ) -> tuple[list[tuple[oracle.Decoded, dict[int, int]]], int]:
        off, bsize = first * LINE, self.bsize
        versions = self.pmem.versions
        dirty = [ln for ln in range(first, end) if ln in versions]
        base = bytes(self.pmem.media[off : off + bsize])
        if not dirty:
            return [(self._decode(lba, base), {})], 1
        options = {ln: [self.pmem.media_line(ln), *versions[ln]] for ln in dirty}
        total = 1
        for opts in options.values():
            total *= len(opts)
        counts = {ln: Counter(opts) for ln, opts in options.items()}
        headers = options.get(first, [base[:LINE]])
        candidates = {bytes(bsize)} | {b for h in headers if (b := self._named_block(h))}
        out: list[tuple[oracle.Decoded, dict[int, int]]] = []
        valid = 0
        for block in sorted(candidates):
            if any(block[(ln - first) * LINE : (ln - first + 1) * LINE]
                   != base[(ln - first) * LINE : (ln - first + 1) * LINE]
                   for ln in range(first, end) if ln not in options):
                continue  # a clean line of the block differs: not reachable
            choice, ways = {}, 1
            for ln, opts in options.items():
                part = block[(ln - first) * LINE : (ln - first + 1) * LINE]
                ways *= counts[ln].get(part, 0)
                if not ways:
                    break
                choice[ln] = opts.index(part)
            if ways:
                valid += ways
                out.append((self._decode(lba, block), choice))
        if valid < total:  # some choice is torn: find one (most are)
            for choice_t in product(*(range(len(o)) for o in options.values())):
                block_t = bytearray(base)
                for (ln, opts), k in zip(options.items(), choice_t, strict=True):
                    block_t[(ln - first) * LINE : (ln - first + 1) * LINE] = opts[k]
                if bytes(block_t) not in candidates:
                    torn = dict(zip(options, choice_t, strict=True))
                    out.append((self._decode(lba, bytes(block_t)), torn))
                    break
        return out, total

    def _named_block(self, header_line: bytes) -> bytes | None:
        """The whole block the payload header in `header_line` names (make_block of its seed,
        lba and write id), or None if the line holds no such header."""
        if header_line not in self._named:
            magic, seed, lba, epoch, thread, op, size = _PAYLOAD_HEAD.unpack_from(header_line)
            self._named[header_line] = (
                make_block(seed, lba, WriteId(epoch, thread, op), size)
                if magic == MAGIC and size == self.bsize else None)
        return self._named[header_line]

    def _decode(self, lba: int, block: bytes) -> oracle.Decoded:
        value = self._decoded.get((lba, block))
        if value is None:
            value = self._decoded[(lba, block)] = decode_block(block, self.seed, lba)
        return value

    def _judge(self, run: _Schedule, recovery: dict[str, Any], survivors: tuple[Any, ...],
               crash_state: dict[int, int]) -> oracle.Verdict:
        key = (run.history_key, survivors)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = oracle.judge(self.workload, run.events, recovery)
            self._verdicts[key] = verdict
            self.stats.judged += 1
        for v in verdict.violations:
            s = self.stats
            if s.first_violation is None:
                s.first_violation = {"kind": v.kind, "interleaving": s.interleavings + 1,
                                     "after_s": round(time.monotonic() - s.started, 3)}
            s.violations[v.kind] = s.violations.get(v.kind, 0) + 1
            best = s.shortest.get(v.kind)
            if best is None or len(run.steps) < best["crash_after_steps"]:
                s.shortest[v.kind] = self._reproduction(run, v, crash_state)
        return verdict

    # -- reproductions ------------------------------------------------------------------------

    def _region(self, line: int) -> str:
        lay, off = self.layout, line * LINE
        if off < lay.ttoff:
            return "superblock"
        if off < lay.ttoff + lay.nblocks * ENTRY_SIZE:
            first = (off - lay.ttoff) // ENTRY_SIZE
            return f"table, entries of LBAs {first}-{first + LINE // ENTRY_SIZE - 1}"
        if off >= lay.dataoff:
            return f"data, PBA {(off - lay.dataoff) // lay.bsize}"
        return "padding"

    def _reproduction(self, run: _Schedule, v: oracle.Violation,
                      crash_state: dict[int, int]) -> dict[str, Any]:
        lines = []
        for ln in sorted(self.pmem.versions)[:_EXAMPLE_LINES]:
            versions = len(self.pmem.versions[ln])
            reached = crash_state.get(ln, 0)
            lines.append({"line": ln, "offset": ln * LINE, "region": self._region(ln),
                          "versions": versions, "reached": reached,
                          "lost": reached != versions})
        return {
            "kind": v.kind, "lba": v.lba, "detail": v.detail, "violation": v.to_json(),
            "params": self.params(), "interleaving": self.stats.interleavings + 1,
            "crash_after_steps": len(run.steps), "schedule": [st["thread"] for st in run.steps],
            "steps": list(run.steps), "plan": self.plan_json(),
            "crash_state": {str(ln): k for ln, k in crash_state.items()},
            "dirty_lines": lines, "history": list(run.events),
        }

    def params(self) -> dict[str, Any]:
        return {"pool_mib": len(self.base) // MIB, "bsize": self.bsize, "threads": self.threads,
                "ops": self.ops, "lbas": self.lbas, "seed": self.seed,
                "preemptions": self.preemptions, "max_interleavings": self.max_interleavings,
                "exhaustive": self.exhaustive, "fault": self.fault}

    def plan_json(self) -> list[list[dict[str, Any]]]:
        return [[{"kind": kind, "lba": lba} for kind, lba in ops] for ops in self.plan]

    def replay(self, schedule: list[int], crash_state: dict[int, int]) -> oracle.Verdict:
        """Re-run `schedule`, cut after its last step, put `crash_state`'s line versions on
        the media, recover and judge."""
        if any(t not in range(self.threads) for t in schedule):
            raise ValueError(f"schedule names a thread outside 0-{self.threads - 1}")

        def follow(runnable: list[int], current: int, used: int, depth: int) -> int:
            if schedule[depth] not in runnable:
                raise ValueError(f"step {depth}: thread {schedule[depth]} cannot run there")
            return schedule[depth]

        run = self._run(follow, crash_at=len(schedule))
        if len(run.steps) < len(schedule):
            raise ValueError(f"the schedule has {len(schedule)} steps, the run ended after "
                             f"{len(run.steps)}")
        for ln, k in crash_state.items():
            if not 0 <= k <= len(self.pmem.versions.get(ln, [])):
                raise ValueError(f"line {ln}: no version {k} at this crash point")
        lines = {ln: self._content(ln, k) for ln, k in crash_state.items() if k}
        mapping = self._recover(lines)
        if isinstance(mapping, str):
            return oracle.judge(self.workload, run.events, {"ok": False, "error": mapping})
        saved = {ln: self.pmem.media_line(ln) for ln in lines}
        media = self.pmem.media
        for ln, content in lines.items():
            media[ln * LINE : (ln + 1) * LINE] = content
        try:
            blocks = {}
            for lba, pba in enumerate(mapping):
                if pba & FLAG_ZERO:
                    blocks[str(lba)] = oracle.ZERO.to_json()
                    continue
                off = self.layout.dataoff + (pba & PBA_MASK) * self.bsize
                blocks[str(lba)] = self._decode(lba, bytes(media[off : off + self.bsize])
                                                ).to_json()
        finally:
            for ln, content in saved.items():
                media[ln * LINE : (ln + 1) * LINE] = content
        return oracle.judge(self.workload, run.events, {"ok": True, "blocks": blocks})

    # -- schedules ----------------------------------------------------------------------------

    def explore(self) -> Stats:
        """Depth-first over the choice points of schedules with <= preemptions preemptions,
        then (unless exhaustive) seeded random schedules, up to max_interleavings."""
        self.stats.started = time.monotonic()
        cap = self.max_interleavings if self.max_interleavings is not None else float("inf")
        stack: list[tuple[int, list[int]]] = []  # (depth, untried threads)
        prefix: list[int] = []
        while self.stats.interleavings < cap:
            choices: list[tuple[int, list[int]]] = []

            def choose(runnable: list[int], current: int, used: int, depth: int,
                       prefix: list[int] = prefix,
                       choices: list[tuple[int, list[int]]] = choices) -> int:
                if depth < len(prefix):
                    return prefix[depth]
                first = current if current in runnable else runnable[0]
                others = [t for t in runnable if t != first]
                if current in runnable and used >= self.preemptions:
                    others = []
                choices.append((depth, others))
                return first

            schedule = [st["thread"] for st in self._run(choose).steps]
            self.stats.interleavings += 1
            stack.extend(c for c in choices if c[1])
            if not stack:
                self.stats.schedules_exhausted = True
                break
            depth, others = stack.pop()
            nxt = others.pop()
            if others:
                stack.append((depth, others))
            prefix = schedule[:depth] + [nxt]
        if self.exhaustive:
            return self.stats
        rng = random.Random(self.seed)
        while self.stats.interleavings < cap:
            self._run(lambda runnable, current, used, depth: rng.choice(runnable))
            self.stats.interleavings += 1
        return self.stats


def run(results: Path, **kwargs: Any) -> tuple[int, Path]:
    """Explore, write results/<run-id>/ (summary.json, violation-N.json, report.html,
    junit.xml);
    (exit code, run dir)."""
    from testbed import report

    started = time.monotonic()
    explorer = Explorer(**kwargs)
    stats = explorer.explore()
    elapsed = time.monotonic() - started
    run_id = time.strftime("explore-%Y%m%d-%H%M%S") + f"-{random.randrange(1 << 16):04x}"
    out = results / run_id
    out.mkdir(parents=True, exist_ok=False)
    reproductions = []
    for i, (kind, repro) in enumerate(sorted(stats.shortest.items()), 1):
        name = f"violation-{i}.json"
        (out / name).write_text(json.dumps(repro, indent=1) + "\n")
        reproductions.append({"kind": kind, "file": name, "lba": repro["lba"],
                              "crash_after_steps": repro["crash_after_steps"],
                              "replay": f"testbed explore --replay {out / name}"})
    complete = stats.schedules_exhausted and not stats.sampled_crash_points
    code = 1 if stats.violations else 0
    summary = {
        "kind": "explore", "run_id": run_id, "params": explorer.params(),
        "plan": explorer.plan_json(), "elapsed_s": round(elapsed, 3),
        "states": stats.states, "judged": stats.judged, "crash_points": stats.crash_points,
        "distinct_images": stats.distinct_images, "interleavings": stats.interleavings,
        "violations": stats.violations,
        "states_per_s": round(stats.states / elapsed, 1) if elapsed else 0.0,
        "complete": complete, "first_violation": stats.first_violation,
        "schedules_exhausted": stats.schedules_exhausted,
        "sampled_crash_points": stats.sampled_crash_points,
        "trace": {"stores": stats.stores, "persists": stats.persists, "fences": stats.fences},
        "reproductions": reproductions,
        "exit_code": code,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    report.render_explore_report(out)
    report.write_explore_junit(out)
    return code, out


def replay(path: Path, test_fault: str = "") -> tuple[int, oracle.Verdict, dict[str, Any]]:
    """Re-run a violation-N.json reproduction: (exit code: 1 if it reproduces, verdict, the
    reproduction). test_fault: TEST ONLY, must match the fault the file was found with (the
    CLI passes none, so a reproduction of an injected defect is refused there)."""
    repro = json.loads(Path(path).read_text())
    if not isinstance(repro, dict) or not {"params", "schedule", "crash_state"} <= repro.keys():
        raise ValueError(f"{path}: not a violation file of testbed explore (needs params, "
                         "schedule, crash_state)")
    params = dict(repro["params"])
    fault = params.pop("fault", "")
    if fault != test_fault:
        raise ValueError(f"{path}: found with the test-only fault {fault!r} injected, which "
                         "no command line can inject")
    explorer = Explorer(**params, fault=fault)
    crash_state = {int(ln): int(k) for ln, k in repro["crash_state"].items()}
    verdict = explorer.replay([int(t) for t in repro["schedule"]], crash_state)
    return (1 if verdict.violations else 0), verdict, repro
