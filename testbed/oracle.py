"""The oracle: was every LBA an atomic (linearizable) register across the power cut?

One cut round (epoch) is judged at a time. The recovery before the round pinned every LBA to
one value (the round's initial value; 'zero' after prepare), and the recovery after it is a read
that follows every op of the round in real time, so the whole campaign is linearizable iff each
round is, given its initial values. Within a round each LBA is checked on its own
(linearizability is compositional, P-compositional for registers).

Per LBA the check is an exact search for a linearization (Wing & Gong with Lowe's memo of
(linearized set, register value)). Ops are scanned in invocation order and only those invoked
before the earliest pending completion are candidates; the linearized set is kept as a frontier
plus the few pending ops below it, so a state costs O(concurrency) and the search visits at
most O(ops x 2^concurrency) states: near-linear for a fixed thread count (BENCHMARKS.md), and
exact even though 'zero' (initial value and every set_zero) is not a unique value, so it never
reports a false violation on zero ambiguity. Real-time order includes program order: two ops of
one thread never count as concurrent, even with equal timestamps.

The record must be consistent: a result without its invoke, an op that is not its thread's
deterministic op, overlapping ops of one thread, a malformed value raise HistoryError (a
testbed failure, exit 2), never a silent skip. A failed recovery is `unrecoverable`, and the
round's reads are still judged (against the updates, with no final read).

Modelling:
- A write or zero without a received `ok` (in flight at the cut, or its ack lost) is
  indeterminate: it may take effect at any instant after its invoke, or never; it cannot take
  effect after the cut, so it must precede the recovery read if it shows up there.
- A read without `ok` tells nothing and is dropped.
- Ops the host never saw invoked: the agent writes an op's `invoke` before starting it, and a
  blocking write to a virtio-serial port returns only once QEMU has taken the line, so on that
  channel no op starts unseen (`unseen_ops` = 0, the default). For a lossy channel,
  `unseen_ops` = k lets each thread have run k ops past its last received event: a surviving
  write id among them counts as an indeterminate write (if the deterministic op sequence says
  it was a write to this LBA), as does any zero op among them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tbagent.payload import ZERO, Decoded, WriteId, op_at

INF = float("inf")
VIOLATION_KINDS = ("torn", "phantom", "lost-ack", "read-reverted", "unrecoverable",
                   "worker-died",
                   # judged by testbed.clients for the fio and ext4 clients
                   "fio-verify", "fsck", "unmountable", "fsync-lost")


@dataclass(frozen=True)
class Op:
    """One op on one LBA. end is INF when no `ok` was received (indeterminate)."""

    kind: str  # write | zero | read | recovered
    value: Decoded
    start: float
    end: float
    thread: int = -1
    op: int = -1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "value": self.value.to_json()}
        if self.kind != "recovered":
            out.update(thread=self.thread, op=self.op, invoke_ns=self.start)
            out["ok_ns"] = None if self.end == INF else self.end
        return out


@dataclass(frozen=True)
class Violation:
    kind: str
    lba: int | None
    detail: str
    survivor: Decoded | None = None
    contradicts: Op | None = None  # the acked write rolled back, or the read that reverted

    def __post_init__(self) -> None:
        if self.kind not in VIOLATION_KINDS:
            raise ValueError(f"unknown violation kind {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lba": self.lba,
            "detail": self.detail,
            "survivor": self.survivor.to_json() if self.survivor else None,
            "contradicts": self.contradicts.to_json() if self.contradicts else None,
        }


@dataclass
class Verdict:
    epoch: int
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.violations:
            counts[v.kind] = counts.get(v.kind, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "ok": self.ok,
            "counts": self.counts(),
            "violations": [v.to_json() for v in self.violations],
            "stats": self.stats,
        }


def judge_create(epoch: int, recovery: dict[str, Any],
                 initial: dict[int, Decoded] | None = None) -> Verdict:
    """A round that cut a create short (cuts.during: create). Create clears the signature first
    and writes it last, so open must find no pool (`not_a_pool`: the testbed creates it anew),
    the old pool intact (every working-set LBA holds its `initial` value: the cut came before
    the signature was cleared) or an empty pool (every LBA zero: the new one whole, or an old
    one that was empty), having passed the read-only check. Any other failure to open is
    `unrecoverable`; a pool that opens with any other mix of blocks is half made: each block
    that is neither old nor zero a `torn` or `phantom`."""
    if not recovery.get("ok"):
        if recovery.get("not_a_pool"):
            return Verdict(epoch, stats={"no_pool": 1})
        return Verdict(epoch, [Violation("unrecoverable", None, f"after a cut during create: "
                                                                f"{recovery.get('error')}")])
    initial = initial or {}
    blocks = {int(lba): Decoded.from_json(value) for lba, value in recovery["blocks"].items()}
    if all(block == ZERO for block in blocks.values()):
        return Verdict(epoch, stats={"empty_pool": 1})
    if all(block == initial.get(lba, ZERO) for lba, block in blocks.items()):
        return Verdict(epoch, stats={"old_pool": 1})
    found = [Violation("torn" if block.kind == "torn" else "phantom", lba,
                       f"after a cut during create lba {lba} reads {block.kind}: neither the "
                       f"old pool's block nor the new pool's zero", survivor=block)
             for lba, block in blocks.items() if block not in (ZERO, initial.get(lba, ZERO))]
    if not found:  # each block is old or zero, but not all alike
        found = [Violation("phantom", None, "after a cut during create the pool reads part old "
                                            "blocks, part zeros: a half-made pool")]
    return Verdict(epoch, found)


def next_resume(events: Iterable[dict[str, Any]], resume: list[int]) -> list[int]:
    """Per-thread op index for the next round: past every op this round was seen invoking."""
    after = list(resume)
    for e in events:
        if e.get("ev") == "invoke" and e["thread"] < len(after):
            after[e["thread"]] = max(after[e["thread"]], e["op"] + 1)
    return after


def initial_state(recovery: dict[str, Any] | None) -> dict[int, Decoded]:
    """Values a recovery pinned (the next round's initial values); empty = all zero."""
    if not recovery or not recovery.get("ok"):
        return {}
    return {int(lba): Decoded.from_json(v) for lba, v in recovery["blocks"].items()}


class HistoryError(ValueError):
    """The event stream contradicts itself (a result without its invoke, an op that is not the
    thread's deterministic op, a malformed event or recovery dump): a testbed failure, never a
    verdict on the target."""


def judge(
    workload: dict[str, Any],
    events: Iterable[dict[str, Any]],
    recovery: dict[str, Any],
    initial: dict[int, Decoded] | None = None,
    unseen_ops: int = 0,
) -> Verdict:
    """Judge one cut round.

    workload: the config the agent's `workload` ran with (seed, epoch, threads, lbas, mix,
    resume); events: what the host received from it; recovery: recover-and-dump's output;
    initial: the previous recovery's values (`initial_state`), None for a freshly prepared target;
    unseen_ops: how many ops per thread may have run without their invoke reaching the host.
    Raises HistoryError when the events or the recovery dump are not a consistent record.
    """
    epoch = workload["epoch"]
    verdict = Verdict(epoch)
    events = [e for e in events if isinstance(e, dict) and e.get("epoch") == epoch]
    verdict.violations.extend(worker_deaths(workload["threads"], events))
    history = _History(workload, events, unseen_ops)
    initial = initial or {}
    recovered = bool(recovery.get("ok"))
    if not recovered:
        # No survivor to judge, but what the round's reads saw is still evidence.
        error = str(recovery.get("error", "recover-and-dump failed"))
        verdict.violations.append(Violation("unrecoverable", None, error))
    blocks = recovery.get("blocks") if recovered else None
    if recovered and not isinstance(blocks, dict):
        raise HistoryError("recovery: ok without a `blocks` mapping")
    for lba in range(workload["lbas"]):
        survivor = None
        if blocks is not None:
            if str(lba) not in blocks:
                raise HistoryError(f"recovery: no block for lba {lba}")
            survivor = _decoded(blocks[str(lba)], f"recovery block of lba {lba}")
        violation = history.check_lba(lba, initial.get(lba, ZERO), survivor)
        if violation:
            verdict.violations.append(violation)
    verdict.stats = history.stats
    return verdict


def _decoded(obj: Any, what: str) -> Decoded:
    try:
        value = Decoded.from_json(obj)
        wid = value.write_id
        if value.kind not in ("zero", "write", "torn", "phantom") or (
            value.kind in ("write", "phantom")
            and (wid is None or not all(isinstance(x, int) for x in wid))
        ):
            raise ValueError(value)
        return value
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise HistoryError(f"{what}: not a block value: {obj!r:.200}") from e


def worker_deaths(threads: int, events: list[dict[str, Any]]) -> list[Violation]:
    """Every workload thread must end its round alive or be cut mid-op. A thread that died of
    an exception the target raised (`died`, with its traceback), or that is missing from a round
    the agent finished (`done` without the thread's `end`), is a finding about the target."""
    found = [
        Violation("worker-died", e.get("lba"),
                  f"thread {e.get('thread')} died in op {e.get('op')} ({e.get('kind')}):\n"
                  f"{e.get('error', '')}")
        for e in events if e.get("ev") == "died"
    ]
    if any(e.get("ev") == "done" for e in events):
        ended = {e.get("thread") for e in events if e.get("ev") in ("end", "fail", "died")}
        found += [Violation("worker-died", None,
                            f"thread {t} vanished: the round finished without its end event")
                  for t in range(threads) if t not in ended]
    return found


def _number(e: dict[str, Any], key: str) -> float:
    value = e.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise HistoryError(f"event without a valid {key!r}: {e!r:.200}")
    return value


def _index(e: dict[str, Any], key: str) -> int:
    value = e.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HistoryError(f"event without a valid {key!r}: {e!r:.200}")
    return value


class _History:
    def __init__(
        self, workload: dict[str, Any], events: list[dict[str, Any]], unseen_ops: int
    ) -> None:
        self.unseen_ops = unseen_ops
        self.seed, self.lbas, self.mix = workload["seed"], workload["lbas"], workload["mix"]
        self.epoch, self.ops = workload["epoch"], workload.get("ops")
        threads = workload["threads"]
        self.resume = workload.get("resume") or [0] * threads
        invokes: dict[tuple[int, int], dict[str, Any]] = {}
        results: dict[tuple[int, int], dict[str, Any]] = {}
        # Per thread: (last op index, time of its last event) the host received.
        self.last_seen: dict[int, tuple[int, float]] = {}
        start_t = 0.0
        for e in events:
            ev = e.get("ev")
            if ev == "start":
                start_t = _number(e, "t")
            elif ev in ("invoke", "ok", "fail"):
                t, key = _number(e, "t"), (_index(e, "thread"), _index(e, "op"))
                if key[0] >= threads:
                    raise HistoryError(f"{ev} of thread {key[0]}, the round has {threads}")
                if ev == "invoke":
                    kind, lba = e.get("kind"), e.get("lba")
                    if (kind, lba) != op_at(self.seed, key[0], key[1], self.lbas, self.mix):
                        raise HistoryError(f"invoke of thread {key[0]} op {key[1]} is "
                                           f"{kind} lba {lba}, not that op: {e!r:.200}")
                    if key in invokes:
                        raise HistoryError(f"thread {key[0]} op {key[1]} invoked twice")
                    invokes[key] = e
                else:
                    inv = invokes.get(key)
                    if inv is None:
                        raise HistoryError(f"orphan result: {ev} of thread {key[0]} op {key[1]}"
                                           " without its invoke before it")
                    if key in results:
                        raise HistoryError(f"thread {key[0]} op {key[1]} has two results")
                    if t < inv["t"]:
                        raise HistoryError(f"thread {key[0]} op {key[1]}: {ev} at {t} before "
                                           f"its invoke at {inv['t']}")
                    results[key] = e
                last = self.last_seen.get(key[0], (-1, -INF))
                self.last_seen[key[0]] = (max(last[0], key[1]), max(last[1], t))
        self._check_program_order(invokes, results)
        self.start_t = start_t
        self._next_zero: list[dict[int, int]] | None = None  # per thread: lba -> unseen zero op
        self.by_lba: dict[int, list[Op]] = {}
        self.writes: dict[int, dict[WriteId, Op]] = {}
        stats = dict(acked_writes=0, indeterminate_writes=0, reads=0, unreported_survivors=0)
        for key, inv in invokes.items():
            res = results.get(key)
            ok = res if res is not None and res["ev"] == "ok" else None
            acked = ok is not None
            kind, lba = inv["kind"], inv["lba"]
            end = ok["t"] if ok is not None else INF
            if kind == "read":
                if ok is None:
                    continue  # a read cut short observed nothing we know of
                if "value" not in ok:
                    raise HistoryError(f"read thread {key[0]} op {key[1]}: ok without a value")
                seen = _decoded(ok["value"], f"read thread {key[0]} op {key[1]}")
                op = Op("read", seen, inv["t"], end, *key)
                stats["reads"] += 1
            else:
                wid = WriteId(self.epoch, *key)
                value = Decoded("write", wid) if kind == "write" else ZERO
                op = Op(kind, value, inv["t"], end, *key)
                stats["acked_writes" if acked else "indeterminate_writes"] += 1
                if kind == "write":
                    self.writes.setdefault(lba, {})[wid] = op
            self.by_lba.setdefault(lba, []).append(op)
        self.stats = stats

    @staticmethod
    def _check_program_order(invokes: dict[tuple[int, int], dict[str, Any]],
                             results: dict[tuple[int, int], dict[str, Any]]) -> None:
        """A thread runs its ops one after the other: each op is invoked no earlier than the
        previous one's result, and an op without a result (cut short, failed) is its last."""
        last: dict[int, tuple[int, float | None]] = {}  # thread -> (op, result time or None)
        for thread, op in sorted(invokes):
            if thread in last:
                prev_op, prev_end = last[thread]
                if prev_end is None:
                    raise HistoryError(f"thread {thread} op {prev_op} has no result, yet the "
                                       f"thread went on to op {op}")
                if invokes[(thread, op)]["t"] < prev_end:
                    raise HistoryError(f"thread {thread} op {op} invoked before op {prev_op} "
                                       "returned")
            res = results.get((thread, op))
            last[thread] = (op, res["t"] if res is not None else None)

    def genuine(self, wid: WriteId, lba: int) -> bool:
        """Was write id `wid` ever a write to `lba` in this campaign's op sequences?"""
        if min(wid) < 0:
            return False
        kind, target = op_at(self.seed, wid.thread, wid.op, self.lbas, self.mix)
        return kind == "write" and target == lba and wid.epoch <= self.epoch

    def unreported_write(self, wid: WriteId, lba: int) -> Op | None:
        """An indeterminate write for a surviving id whose invoke never reached the host."""
        if wid.epoch != self.epoch or not self.genuine(wid, lba):
            return None
        if wid.thread >= len(self.resume) or wid.op < self.resume[wid.thread]:
            return None
        last_op, last_t = self.last_seen.get(
            wid.thread, (self.resume[wid.thread] - 1, self.start_t)
        )
        if not last_op < wid.op < self.unseen_end(wid.thread, last_op):
            return None  # not among the ops this thread could have run unseen
        return Op("write", Decoded("write", wid), last_t, INF, wid.thread, wid.op)

    def unseen_end(self, thread: int, last_op: int) -> int:
        """One past the last op index `thread` may have run without the host seeing it."""
        end = last_op + 1 + self.unseen_ops
        if self.ops is not None:
            end = min(end, self.resume[thread] + self.ops)
        return end

    def unreported_zeros(self, lba: int) -> list[Op]:
        """Indeterminate zero ops to `lba` that a thread may have run after its last received
        event (zeros carry no id, so a surviving zero cannot name its op)."""
        if self._next_zero is None:
            self._next_zero = []
            for thread, resume in enumerate(self.resume):
                last_op = self.last_seen.get(thread, (resume - 1, 0))[0]
                first: dict[int, int] = {}
                for index in range(last_op + 1, self.unseen_end(thread, last_op)):
                    kind, target = op_at(self.seed, thread, index, self.lbas, self.mix)
                    if kind == "zero":
                        first.setdefault(target, index)
                self._next_zero.append(first)
        found = []
        for thread, first in enumerate(self._next_zero):
            if lba in first:
                last_t = self.last_seen.get(thread, (0, self.start_t))[1]
                found.append(Op("zero", ZERO, last_t, INF, thread, first[lba]))
        return found

    def bad_value(self, lba: int, value: Decoded) -> str | None:
        """'torn' or 'phantom' when `value` is no value this LBA could ever hold."""
        if value.kind == "torn":
            return "torn"
        if value.kind == "phantom":
            return "phantom"
        if value.kind == "write" and (value.write_id is None
                                      or not self.genuine(value.write_id, lba)):
            return "phantom"
        return None

    def check_lba(self, lba: int, initial: Decoded,
                  survivor: Decoded | None) -> Violation | None:
        """One LBA's verdict; `survivor` None when recovery failed (only the reads are judged:
        the round's updates and reads, with no final read)."""
        ops = list(self.by_lba.get(lba, []))
        final = Op("recovered", survivor if survivor is not None else ANY, INF, INF)
        if survivor == ZERO:
            ops.extend(self.unreported_zeros(lba))
        observations = [op for op in ops if op.kind == "read"]
        if survivor is not None:
            observations.append(final)
        for op in observations:
            if op.value == initial:
                # The round's initial value: whatever it is, it was judged in the round whose
                # recovery pinned it (a torn or phantom block is reported once, there).
                continue
            kind = self.bad_value(lba, op.value)
            if kind is None:
                wid = op.value.write_id
                if wid is None or wid.epoch != self.epoch or wid in self.writes.get(lba, {}):
                    continue
                unreported = self.unreported_write(wid, lba) if op is final else None
                if unreported is not None:
                    self.stats["unreported_survivors"] += 1
                    ops.append(unreported)
                    continue
                kind = "phantom"
            seen = "survived recovery" if op is final else f"was read by thread {op.thread}"
            what = {"torn": "a torn block", "phantom": "a value never written to this LBA"}
            return Violation(
                kind, lba, f"{what[kind]} {seen}", survivor, None if op is final else op
            )
        if linearizable([*ops, final], initial):
            return None
        return self._explain(lba, ops, final, initial)

    def _explain(self, lba: int, ops: list[Op], final: Op, initial: Decoded) -> Violation:
        """Name the violation: lost-ack if writes alone contradict the survivor, else the
        earliest-completing read whose observation cannot be reconciled."""
        survivor = None if final.value is ANY else final.value
        updates = [op for op in ops if op.kind != "read"]
        if not linearizable([*updates, final], initial):
            # The survivor's producers all completed before some acked update began.
            producers = [op.end for op in updates if op.value == survivor]
            producers_end = max(producers, default=-INF)
            acked = [op for op in updates if op.end != INF and op.value != survivor]
            later = [op for op in acked if op.start > producers_end] or acked
            if not later:
                return Violation(
                    "read-reverted",
                    lba,
                    "the value the previous recovery saw reverted to an older one",
                    survivor,
                )
            return Violation(
                "lost-ack",
                lba,
                "an acknowledged write was rolled back: the surviving value precedes it",
                survivor,
                max(later, key=lambda op: op.end),
            )
        reads = sorted((op for op in ops if op.kind == "read"), key=lambda op: op.end)
        lo, hi = 1, len(reads)  # the shortest failing prefix of reads, by binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if linearizable([*updates, *reads[:mid], final], initial):
                lo = mid + 1
            else:
                hi = mid
        return Violation(
            "read-reverted",
            lba,
            f"thread {reads[lo - 1].thread} read a value that a later state reverted",
            survivor,
            reads[lo - 1],
        )


ANY = Decoded("any")  # the value of a final read that matches whatever the register holds


def linearizable(ops: list[Op], initial: Decoded) -> bool:
    """Is there a legal register order of `ops` consistent with real time?

    Real time: `a` precedes `b` when a ended before b began (a.end < b.start) or both are ops of
    one thread and a came first in it (equal timestamps of one thread are not concurrency).
    Indeterminate ops (end INF) may be left out: the check succeeds once the final 'recovered'
    read (start INF; value ANY matches anything) is linearized, whatever indeterminate ops
    remain.

    Search: depth-first over states (frontier, pending, value) with a memo (Lowe's cache): ops
    sorted by invocation; every op below `frontier` is linearized except those in `pending`
    (a sorted tuple), and none at or above it is. Candidates are the pending ops and the ops
    from the frontier on that were invoked before the earliest end among the unlinearized
    ones, so a state costs O(concurrency), not O(ops), however long an indeterminate op stays
    pending. An indeterminate update whose value no read and no final read observes can never
    be needed (dropping it from an order keeps the order legal), so it is left out up front:
    a write that failed early no longer doubles the states.
    """
    observed = {op.value for op in ops if op.kind in ("read", "recovered")}
    wildcard = ANY in observed
    ops = [op for op in ops
           if op.end != INF or op.kind in ("read", "recovered") or wildcard
           or op.value in observed]
    ops.sort(key=lambda op: (op.start, op.thread, op.op))
    n = len(ops)
    starts = [op.start for op in ops]
    ends = [op.end for op in ops]
    # Program order: the previous op of the same thread that has an end (-1: none); an op
    # without one (cut short, failed) may have taken effect or not, but not after its successor.
    prev_of_thread: dict[int, int] = {}
    prev = [-1] * n
    for i, op in enumerate(ops):
        if op.thread >= 0:
            prev[i] = prev_of_thread.get(op.thread, -1)
            if op.end != INF:
                prev_of_thread[op.thread] = i
    seen: set[tuple[int, tuple[int, ...], Decoded]] = set()
    stack: list[tuple[int, tuple[int, ...], Decoded]] = [(0, (), initial)]
    while stack:
        frontier, pending, value = stack.pop()
        horizon = INF
        for p in pending:
            horizon = min(horizon, ends[p])
        limit = frontier
        while limit < n and starts[limit] <= horizon:
            horizon = min(horizon, ends[limit])
            limit += 1
        # Candidates: pending ops and ops in [frontier, limit) invoked by the horizon.
        candidates = [p for p in pending if starts[p] <= horizon]
        candidates += [i for i in range(frontier, limit) if starts[i] <= horizon]
        for i in candidates:
            op = ops[i]
            before = prev[i]
            if before >= 0 and not _done(before, frontier, pending):
                continue  # the thread's previous op must take effect first
            if op.kind in ("read", "recovered"):
                if op.value is not ANY and op.value != value:
                    continue
                if op.kind == "recovered":
                    return True
                new_value = value
            else:
                new_value = op.value
            if i < frontier:
                rest: tuple[int, ...] = tuple(p for p in pending if p != i)
                new_frontier = frontier
            else:
                rest = pending + tuple(range(frontier, i))
                new_frontier = i + 1
            if op.thread >= 0:
                # Its thread's earlier indeterminate ops can no longer take effect.
                rest = tuple(p for p in rest
                             if not (ops[p].thread == op.thread and ends[p] == INF and p < i))
            state = (new_frontier, rest, new_value)
            if state not in seen:
                seen.add(state)
                stack.append(state)
    return False


def _done(i: int, frontier: int, pending: tuple[int, ...]) -> bool:
    return i < frontier and i not in pending
