"""`testbed explore`: model-check the real BTT8 code (btt8.steps) against ADR crash states, on
the host, no VM.

Threads. Each of --threads threads runs --ops operations (writes of a unique payload, reads) on
LBAs drawn from --lbas by the seed, as btt8.steps generators; a scheduler picks who runs the
next PlusCal step. Schedules are enumerated depth-first, stateless (each one re-executed on a
fresh pool): every schedule with at most --preemptions preemptions (switching away from a thread
that could go on), up to --max-interleavings; if the bounded space is exhausted first, seeded
random schedules fill the rest.

Memory. The pool runs on a tracing backend (TracePmem): loads come from a DRAM copy, every
store dirties 64-byte lines, a persist writes its lines through to the media image; it counts
stores, persists and fences. At every step boundary of every schedule (a crash point) the crash
states are: the media, plus any subset of the dirty lines having reached it (a line reaches the
media whole, with its current content; 8-byte stores inside it are atomic).

Reduction (after Jaaru, ASPLOS 2021: branch only on what the post-crash execution reads).
Instead of 2^d images for d dirty lines, recovery is run on the image first and only the lines
it depends on are branched on:
  1. the dirty lines of the translation table (what BTT8's open reads to build the map; in
     practice the 1-3 entries in flight) are enumerated exhaustively (2^t images, t capped
     at 10, beyond which the subsets are sampled);
  2. for each, open (recovery) runs once and gives each judged LBA's block; a block's dirty
     lines are then branched on per LBA - none, all, and, if it has several, the first alone
     (a torn mix) - and each LBA judged on its own: the per-LBA oracle is per LBA, so the cross
     product of the LBAs' variants (counted in `states`) need not be recovered one by one;
  3. dirty lines nothing reads after the crash (free blocks, lines of other LBAs) are never
     branched on; identical images (same media content, same table subset) are recovered once
     (`distinct_images`) and crash points whose images were all seen before cost a lookup.
What it may miss: an older content of a dirty line (a line written twice without a persist may
reach the media with the first version: only the current one is tried); torn mixes of a block
other than first-line-only; a defect visible only through a specific combination of data-line
subsets across two LBAs (each LBA is judged alone); anything only a schedule beyond the
preemption bound or the interleaving cap shows; crashes inside a step (a step's stores are one
unit here except where they dirty several lines, which the line subsets cover).

Judging: per LBA, the recovered block must be the payload of a write that no write acknowledged
before the crash (returned) was invoked after it returned, or the initial zeros if no write
was acknowledged (the linearizability rule of testbed.oracle, specialised to writes that carry
unique payloads): "lost-ack" (an older value), "garbage" (no write's payload: a torn or
unwritten block) or "unrecoverable" (open failed). Each violation is reported with its schedule
(thread per step) and crash point and the dirty lines that were lost; `testbed explore ...
--replay N` is not there yet: the same flags and seed enumerate the same schedules in order.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from btt8.core import ENTRY_SIZE, FLAG_ZERO, PBA_MASK, Layout, Pool, format_pool
from btt8.pmem import LINE, Pmem
from btt8.steps import read_steps, write_steps

MIB = 1 << 20
_TABLE_SUBSETS_CAP = 10


class TracePmem(Pmem):
    """DRAM copy + media image; stores dirty lines, persist writes them through."""

    persist_mode = "trace"

    def __init__(self, media: bytearray) -> None:
        super().__init__(bytearray(media))
        self.media = media
        self.dirty: set[int] = set()
        self.stores = self.persists = self.fences = 0
        self.media_key = 0  # XOR of hash(line, content) over written-through lines: O(1) each
        q = self.visible_words

        def store8(word: int, value: int) -> None:
            q[word] = value
            self.stores += 1
            self.dirty.add(word >> 3)

        self.store8 = store8

    @property
    def atomic_swap(self) -> bool:
        return True

    def store(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self._mv[off : off + len(data)] = data
        self.stores += 1
        self.dirty.update(range(off // LINE, (off + len(data) + LINE - 1) // LINE))

    def store_persist(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.store(off, data)
        self.persist(off, len(data))

    def cas16(self, word: int, old_lo: int, old_hi: int, new_lo: int, new_hi: int) -> bool:
        if super().cas16(word, old_lo, old_hi, new_lo, new_hi):
            self.stores += 1
            self.dirty.add(word >> 3)
            return True
        return False

    def persist(self, off: int, n: int) -> None:
        self.persists += 1
        for line in range(off // LINE, (off + n + LINE - 1) // LINE):
            if line in self.dirty:
                self.dirty.discard(line)
                s = line * LINE
                old, new = bytes(self.media[s : s + LINE]), bytes(self._buf[s : s + LINE])
                self.media_key ^= hash((line, old)) ^ hash((line, new))
                self.media[s : s + LINE] = new

    def fence(self) -> None:
        self.fences += 1

    def line(self, line: int) -> bytes:
        return bytes(self._buf[line * LINE : (line + 1) * LINE])


class _ImagePmem(Pmem):
    """A Pmem over an existing bytearray (no copy): recovery reads the crash image in place."""

    persist_mode = "image"

    def persist(self, off: int, n: int) -> None:
        pass


@dataclass
class _Write:
    thread: int
    op: int
    lba: int
    payload: bytes
    invoked: int
    returned: int | None = None


@dataclass
class Stats:
    states: int = 0
    evaluations: int = 0
    crash_points: int = 0
    interleavings: int = 0
    distinct_images: int = 0
    stores: int = 0
    persists: int = 0
    fences: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)


def _payload(thread: int, op: int, lba: int, bsize: int) -> bytes:
    head = struct.pack("<QQQ", thread + 1, op + 1, lba)
    return (head * (bsize // len(head) + 1))[:bsize]


class Explorer:
    def __init__(self, *, pool_mib: int = 16, bsize: int = 512, threads: int = 2, ops: int = 3,
                 lbas: int = 1, seed: int = 0, preemptions: int = 2,
                 max_interleavings: int = 200, fault: str = "") -> None:
        self.bsize, self.threads, self.ops, self.lbas = bsize, threads, ops, lbas
        self.seed, self.preemptions, self.max_interleavings = seed, preemptions, max_interleavings
        self.fault = fault  # TEST ONLY: a btt8 test fault (Pool._inject_test_fault)
        media = bytearray(pool_mib * MIB)
        self.layout = Layout.for_pool(bsize, len(media))
        fmt = _ImagePmem(media)
        format_pool(fmt, self.layout)
        fmt.close()
        self.base = bytes(media)
        rng = random.Random(seed)
        self.plan = [[(rng.random() < 2 / 3, rng.randrange(lbas)) for _ in range(ops)]
                     for _ in range(threads)]
        lay = self.layout
        self.table_lines = range(lay.ttoff // LINE, (lay.ttoff + lay.nblocks * ENTRY_SIZE
                                                     + LINE - 1) // LINE)
        self.stats = Stats()
        self._recovered: dict[bytes, dict[int, int] | str] = {}

    # -- one schedule -------------------------------------------------------------------------

    def _run(self, choose: Any) -> list[int]:
        """Execute one schedule; choose(runnable, current, preemptions_used, depth) -> thread.
        Every step boundary is a crash point. Returns the schedule (thread per step)."""
        media = bytearray(self.base)
        pmem = TracePmem(media)
        pool = Pool(pmem)
        if self.fault:
            pool._inject_test_fault(self.fault)
        writes: list[_Write] = []
        clock = [0]

        def thread_body(t: int) -> Generator[str, None, None]:
            buf = bytearray(self.bsize)
            for i, (is_write, lba) in enumerate(self.plan[t]):
                if is_write:
                    w = _Write(t, i, lba, _payload(t, i, lba, self.bsize), clock[0])
                    writes.append(w)
                    yield from write_steps(pool, lba, w.payload)
                    w.returned = clock[0]
                else:
                    yield from read_steps(pool, lba, buf)

        gens = [thread_body(t) for t in range(self.threads)]
        pending: list[str | None] = []
        for g in gens:
            pending.append(next(g, None))
        schedule: list[int] = []
        current, used = -1, 0
        self._crash_point(pmem, media, writes, schedule)
        while True:
            runnable = [t for t in range(self.threads) if pending[t] is not None]
            if not runnable:
                break
            t = choose(runnable, current, used, len(schedule))
            if current in runnable and t != current:
                used += 1
            current = t
            clock[0] += 1
            pending[t] = next(gens[t], None)
            clock[0] += 1
            schedule.append(t)
            self._crash_point(pmem, media, writes, schedule)
        s = self.stats
        s.stores += pmem.stores
        s.persists += pmem.persists
        s.fences += pmem.fences
        pool.close()
        return schedule

    # -- crash states -------------------------------------------------------------------------

    def _crash_point(self, pmem: TracePmem, media: bytearray, writes: list[_Write],
                     schedule: list[int]) -> None:
        s = self.stats
        s.crash_points += 1
        dirty = pmem.dirty
        table_dirty = sorted(ln for ln in dirty if ln in self.table_lines)
        if len(table_dirty) <= _TABLE_SUBSETS_CAP:
            subsets = [c for k in range(len(table_dirty) + 1)
                       for c in combinations(table_dirty, k)]
        else:
            rng = random.Random(len(schedule))
            subsets = [tuple(ln for ln in table_dirty if rng.random() < 0.5) for _ in range(1024)]
        media_key = pmem.media_key.to_bytes(8, "little", signed=True)
        touched = {w.lba for w in writes} | {lba for plan in self.plan for _, lba in plan}
        for subset in subsets:
            lines = {ln: pmem.line(ln) for ln in subset}
            key = media_key + b"".join(ln.to_bytes(8, "little") + c for ln, c in lines.items())
            mapping = self._recovered.get(key)
            if mapping is None:
                mapping = self._recover(media, lines, touched)
                self._recovered[key] = mapping
                s.distinct_images += 1
            lost = sorted(set(dirty) - set(subset))
            if isinstance(mapping, str):
                s.states += 1
                self._violation("unrecoverable", mapping, schedule, lost)
                continue
            product = 1
            for lba in sorted(touched):
                product *= self._judge_lba(lba, mapping[lba], pmem, media, dirty, writes,
                                           schedule, lost)
            s.states += product

    def _recover(self, media: bytearray, lines: dict[int, bytes],
                 lbas: set[int]) -> dict[int, int] | str:
        saved = {ln: bytes(media[ln * LINE : (ln + 1) * LINE]) for ln in lines}
        for ln, content in lines.items():
            media[ln * LINE : (ln + 1) * LINE] = content
        try:
            pool = Pool(_ImagePmem(media))
            try:
                return {lba: pool._pbas[lba] for lba in lbas}
            finally:
                pool.close()
        except Exception as e:  # whatever recovery raises is the evidence
            return f"{type(e).__name__}: {e}"
        finally:
            for ln, content in saved.items():
                media[ln * LINE : (ln + 1) * LINE] = content

    def _judge_lba(self, lba: int, pba: int, pmem: TracePmem, media: bytearray,
                   dirty: set[int], writes: list[_Write], schedule: list[int],
                   lost: list[int]) -> int:
        """Judge the LBA under each variant of its block's dirty lines; returns the count."""
        bsize = self.bsize
        if pba & FLAG_ZERO:
            variants = [bytes(bsize)]
        else:
            off = self.layout.dataoff + (pba & PBA_MASK) * bsize
            first, end = off // LINE, (off + bsize) // LINE
            block_dirty = [ln for ln in range(first, end) if ln in dirty]
            base = bytes(media[off : off + bsize])
            variants = [base]
            if block_dirty:
                whole = bytearray(base)
                for ln in block_dirty:
                    r = ln * LINE - off
                    whole[r : r + LINE] = pmem.line(ln)
                variants.append(bytes(whole))
                if len(block_dirty) > 1:
                    torn = bytearray(base)
                    r = block_dirty[0] * LINE - off
                    torn[r : r + LINE] = pmem.line(block_dirty[0])
                    variants.append(bytes(torn))
        acked = [w for w in writes if w.lba == lba and w.returned is not None]
        for value in variants:
            self.stats.evaluations += 1
            kind = self._verdict(value, lba, writes, acked)
            if kind:
                self._violation(kind, f"LBA {lba}", schedule, lost)
        return len(variants)

    def _verdict(self, value: bytes, lba: int, writes: list[_Write],
                 acked: list[_Write]) -> str:
        if value == bytes(self.bsize) and not acked:
            return ""
        match = next((w for w in writes if w.lba == lba and w.payload == value), None)
        if match is None:
            return "lost-ack" if value == bytes(self.bsize) else "garbage"
        if match.returned is not None and any(a.invoked > match.returned for a in acked):
            return "lost-ack"
        return ""

    def _violation(self, kind: str, what: str, schedule: list[int], lost: list[int]) -> None:
        s = self.stats
        s.violations[kind] = s.violations.get(kind, 0) + 1
        if len(s.examples) < 20 and (not s.examples or len(schedule) < len(
                s.examples[-1]["schedule"]) or kind not in {e["kind"] for e in s.examples}):
            s.examples.append({"kind": kind, "what": what, "interleaving": s.interleavings,
                               "crash_after_steps": len(schedule), "schedule": list(schedule),
                               "lost_lines": lost[:64]})

    # -- schedules ----------------------------------------------------------------------------

    def explore(self) -> Stats:
        """Depth-first over the choice points of schedules with <= preemptions preemptions,
        then seeded random schedules, up to max_interleavings."""
        stack: list[tuple[int, list[int], int]] = []  # (depth, untried options, used)
        prefix: list[int] = []
        exhausted = False
        while self.stats.interleavings < self.max_interleavings and not exhausted:
            choices: list[tuple[int, list[int], int]] = []

            def choose(runnable: list[int], current: int, used: int, depth: int,
                       prefix: list[int] = prefix,
                       choices: list[tuple[int, list[int], int]] = choices) -> int:
                if depth < len(prefix):
                    return prefix[depth]
                first = current if current in runnable else runnable[0]
                others = [t for t in runnable if t != first]
                if current in runnable and used >= self.preemptions:
                    others = []
                choices.append((depth, others, used))
                return first

            schedule = self._run(choose)
            self.stats.interleavings += 1
            stack.extend(c for c in choices if c[1])
            while stack:
                depth, others, _used = stack.pop()
                nxt = others.pop()
                if others:
                    stack.append((depth, others, _used))
                prefix = schedule[:depth] + [nxt]
                break
            else:
                exhausted = True
        rng = random.Random(self.seed)
        while self.stats.interleavings < self.max_interleavings:
            self._run(lambda runnable, current, used, depth: rng.choice(runnable))
            self.stats.interleavings += 1
        return self.stats


def run(results: Path, **kwargs: Any) -> tuple[int, Path]:
    """Explore, write results/<run-id>/summary.json; (exit code, run dir)."""
    started = time.monotonic()
    explorer = Explorer(**kwargs)
    stats = explorer.explore()
    elapsed = time.monotonic() - started
    run_id = time.strftime("explore-%Y%m%d-%H%M%S") + f"-{random.randrange(1 << 16):04x}"
    out = results / run_id
    out.mkdir(parents=True, exist_ok=False)
    summary = {
        "kind": "explore", "params": kwargs, "elapsed_s": round(elapsed, 3),
        "states": stats.states, "evaluations": stats.evaluations,
        "crash_points": stats.crash_points, "distinct_images": stats.distinct_images,
        "interleavings": stats.interleavings, "violations": stats.violations,
        "states_per_s": round(stats.states / elapsed, 1) if elapsed else 0.0,
        "trace": {"stores": stats.stores, "persists": stats.persists, "fences": stats.fences},
        "examples": stats.examples,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return (1 if stats.violations else 0), out
