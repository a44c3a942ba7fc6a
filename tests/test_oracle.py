"""The oracle on hand-written histories (each violation kind, tricky passing cases) and on
histories of a simulated atomic register (hypothesis): those must never be judged violations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tbagent.payload import ZERO, Decoded, WriteId, op_at

from testbed.oracle import INF, Op, initial_state, judge, linearizable, next_resume

SEED = 11
MIX = {"read": 1.0, "write": 1.0, "zero": 1.0}


@dataclass
class History:
    """Builds the event stream the agent would send, choosing real op indexes from the
    deterministic sequence so every write id is genuine for its LBA."""

    lbas: int = 2
    threads: int = 2
    epoch: int = 0
    resume: list[int] = field(default_factory=lambda: [0, 0])
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_index = list(self.resume)
        self.events.append({"ev": "start", "t": 0, "epoch": self.epoch})

    def op(self, thread: int, kind: str, lba: int) -> int:
        index = self.next_index[thread]
        while op_at(SEED, thread, index, self.lbas, MIX) != (kind, lba):
            index += 1
        self.next_index[thread] = index + 1
        return index

    def invoke(self, t: int, thread: int, kind: str, lba: int) -> int:
        index = self.op(thread, kind, lba)
        self.events.append(
            {
                "ev": "invoke",
                "t": t,
                "epoch": self.epoch,
                "thread": thread,
                "op": index,
                "kind": kind,
                "lba": lba,
            }
        )
        return index

    def ok(self, t: int, thread: int, index: int, value: Decoded | None = None) -> None:
        inv = next(e for e in self.events if e.get("op") == index and e.get("thread") == thread)
        e = {**inv, "ev": "ok", "t": t}
        if value is not None:
            e["value"] = value.to_json()
        self.events.append(e)

    def write(self, start: int, end: int | None, thread: int = 0, lba: int = 0) -> Decoded:
        index = self.invoke(start, thread, "write", lba)
        if end is not None:
            self.ok(end, thread, index)
        return Decoded("write", WriteId(self.epoch, thread, index))

    def zero(self, start: int, end: int | None, thread: int = 0, lba: int = 0) -> None:
        index = self.invoke(start, thread, "zero", lba)
        if end is not None:
            self.ok(end, thread, index)

    def read(self, start: int, end: int, value: Decoded, thread: int = 1, lba: int = 0) -> None:
        self.ok(end, thread, self.invoke(start, thread, "read", lba), value)

    def judge(
        self, *survivors: Decoded, initial: dict[int, Decoded] | None = None, unseen_ops: int = 0
    ):
        config = {
            "seed": SEED,
            "epoch": self.epoch,
            "threads": self.threads,
            "lbas": self.lbas,
            "mix": MIX,
            "resume": self.resume,
        }
        blocks = {str(lba): v.to_json() for lba, v in enumerate(survivors)}
        blocks.update({str(lba): ZERO.to_json() for lba in range(len(survivors), self.lbas)})
        return judge(config, self.events, {"ok": True, "blocks": blocks}, initial, unseen_ops)


def kinds(verdict) -> list[str]:
    return [v.kind for v in verdict.violations]


# --- passing histories -------------------------------------------------------------------


def test_untouched_target_stays_zero() -> None:
    assert History().judge().ok


def test_last_acked_write_survives() -> None:
    h = History()
    h.write(0, 10)
    w2 = h.write(20, 30)
    assert h.judge(w2).ok


def test_concurrent_overlapping_writes_either_may_survive() -> None:
    for survivor in (0, 1):
        h = History()
        w = [h.write(0, 20, thread=0), h.write(5, 25, thread=1)]
        assert h.judge(w[survivor]).ok


def test_in_flight_write_may_or_may_not_survive() -> None:
    h = History()
    w1 = h.write(0, 10)
    w2 = h.write(20, None)
    assert h.judge(w1).ok
    assert h.judge(w2).ok


def test_read_of_an_in_flight_write_then_that_write_survives() -> None:
    h = History()
    h.write(0, 10)
    w2 = h.write(20, None, thread=0)
    h.read(30, 40, w2, thread=1)
    assert h.judge(w2).ok


def test_in_flight_zero_explains_a_surviving_zero() -> None:
    h = History()
    h.write(0, 10)
    h.zero(20, None)
    assert h.judge(ZERO).ok


def test_zero_from_set_zero_not_confused_with_initial() -> None:
    # initial zero, W acked, a zero op acked, a reader sees zero: that zero is the set_zero's.
    h = History()
    h.write(0, 10)
    h.zero(20, 30)
    h.read(40, 50, ZERO)
    assert h.judge(ZERO).ok


def test_read_of_initial_zero_concurrent_with_first_write() -> None:
    h = History()
    w = h.write(0, 100, thread=0)
    h.read(10, 20, ZERO, thread=1)
    h.read(30, 40, w, thread=1)
    assert h.judge(w).ok


def test_surviving_write_whose_invoke_never_reached_the_host() -> None:
    h = History()
    h.write(0, 10)
    # The thread went on to a later write whose invoke event was lost on a lossy channel ...
    lost = Decoded("write", WriteId(0, 0, h.op(0, "write", 0)))
    assert h.judge(lost, unseen_ops=50).ok
    # ... which a synchronous channel (virtio-serial, blocking writes) cannot lose.
    assert kinds(h.judge(lost)) == ["phantom"]


def test_next_round_starts_from_what_recovery_saw() -> None:
    first = History()
    w = first.write(0, 10)
    first_verdict = first.judge(w)
    assert first_verdict.ok
    initial = initial_state({"ok": True, "blocks": {"0": w.to_json(), "1": ZERO.to_json()}})
    second = History(epoch=1, resume=list(first.next_index))
    assert second.judge(w, initial=initial).ok
    w2 = second.write(0, None)
    assert second.judge(w2, initial=initial).ok


def test_carried_over_torn_block_is_not_reported_again() -> None:
    torn = Decoded("torn", digest="abcd")
    assert History(epoch=1).judge(torn, initial={0: torn}).ok


# --- histories that must fail ------------------------------------------------------------


def test_torn_survivor() -> None:
    h = History()
    h.write(0, 10)
    verdict = h.judge(Decoded("torn", digest="ff"))
    assert kinds(verdict) == ["torn"]
    assert verdict.violations[0].lba == 0


def test_torn_read() -> None:
    h = History()
    w = h.write(0, 10)
    h.read(20, 30, Decoded("torn", digest="ff"))
    assert kinds(h.judge(w)) == ["torn"]


def test_phantom_block_of_another_lba() -> None:
    h = History()
    w = h.write(0, 10, lba=1)
    verdict = h.judge(Decoded("phantom", w.write_id, other_lba=1), w)
    assert kinds(verdict) == ["phantom"]


def test_phantom_write_id_never_written_to_that_lba() -> None:
    h = History()
    w_lba1 = h.write(0, 10, lba=1)
    # A valid block for lba 0 carrying an id that was a write to lba 1.
    assert kinds(h.judge(w_lba1, w_lba1)) == ["phantom"]


def test_phantom_write_id_never_invoked() -> None:
    h = History()
    skipped = h.op(0, "write", 0)  # a genuine write to lba 0 ...
    h_lba1 = h.write(
        0, 10, thread=0, lba=1
    )  # ... but the thread's later op reached the host, not it
    never = Decoded("write", WriteId(0, 0, skipped))
    assert kinds(h.judge(never, h_lba1)) == ["phantom"]


def test_phantom_read() -> None:
    h = History()
    w = h.write(0, 10)
    h.read(20, 30, Decoded("write", WriteId(0, 1, 999_999)))
    assert kinds(h.judge(w)) == ["phantom"]


def test_lost_ack_names_the_rolled_back_write() -> None:
    h = History()
    w1 = h.write(0, 10)
    h.write(20, 30)
    verdict = h.judge(w1)
    assert kinds(verdict) == ["lost-ack"]
    contradicts = verdict.violations[0].contradicts
    assert (contradicts.start, contradicts.end) == (20, 30)
    assert verdict.to_json()["violations"][0]["survivor"]["write_id"] == list(w1.write_id)


def test_lost_ack_back_to_initial_zero() -> None:
    h = History(threads=1, resume=[0])
    h.write(0, 10)
    assert kinds(h.judge(ZERO)) == ["lost-ack"]


def test_lost_ack_with_zero_op_finished_before_the_write() -> None:
    h = History(threads=1, resume=[0])
    h.zero(0, 10)
    h.write(20, 30)
    assert kinds(h.judge(ZERO)) == ["lost-ack"]


def test_read_reverted_in_flight_write_seen_then_gone() -> None:
    h = History(threads=3, resume=[0, 0, 0])
    w1 = h.write(0, 10, thread=0)
    w2 = h.write(5, None, thread=2)
    h.read(20, 21, w2, thread=1)
    verdict = h.judge(w1)
    assert kinds(verdict) == ["read-reverted"]
    assert verdict.violations[0].contradicts.value == w2


def test_read_reverted_zero_seen_after_write_then_write_survives() -> None:
    h = History(threads=3, resume=[0, 0, 0])
    w = h.write(0, 10, thread=0)
    h.zero(5, 20, thread=2)
    h.read(12, 13, ZERO, thread=1)
    assert kinds(h.judge(w)) == ["read-reverted"]


def test_reads_reverting_among_themselves() -> None:
    h = History()
    w1 = h.write(0, 10, thread=0)
    w2 = h.write(20, 30, thread=0)
    h.read(40, 41, w2, thread=1)
    h.read(50, 51, w1, thread=1)
    assert kinds(h.judge(w2)) == ["read-reverted"]


def test_value_reverts_to_before_previous_recovery() -> None:
    first = History()
    w1 = first.write(0, 10)
    w2 = first.write(20, 30)
    second = History(epoch=1, resume=list(first.next_index))
    assert kinds(second.judge(w1, initial={0: w2})) == ["read-reverted"]


def test_unrecoverable() -> None:
    config = {"seed": SEED, "epoch": 0, "threads": 1, "lbas": 1, "mix": MIX}
    verdict = judge(config, [], {"ok": False, "error": "PoolCorrupt: nfree != 4096"})
    assert kinds(verdict) == ["unrecoverable"]
    assert verdict.to_json()["violations"][0]["detail"] == "PoolCorrupt: nfree != 4096"


def test_violations_are_per_lba_and_counted() -> None:
    h = History(threads=1, resume=[0])
    h.write(0, 10, lba=0)
    h.write(20, 30, lba=1)
    verdict = h.judge(ZERO, Decoded("torn", digest="00"))
    assert verdict.counts() == {"lost-ack": 1, "torn": 1}
    assert sorted(v.lba for v in verdict.violations) == [0, 1]


def test_linearizable_respects_real_time_order() -> None:
    a, b = Decoded("write", WriteId(0, 0, 1)), Decoded("write", WriteId(0, 0, 2))
    ops = [Op("write", a, 0, 1), Op("write", b, 2, 3)]
    assert linearizable([*ops, Op("recovered", b, INF, INF)], ZERO)
    assert not linearizable([*ops, Op("recovered", a, INF, INF)], ZERO)


# --- a simulated atomic register never produces a violation -----------------------------


@st.composite
def register_runs(draw):
    """Threads step through invoke -> take effect -> respond at random interleavings; the
    register changes exactly at 'take effect', so every history is linearizable. A random
    prefix of the events reaches the host (acks lost in the cut)."""
    threads = draw(st.integers(1, 3))
    lbas = draw(st.integers(1, 3))
    rounds = draw(st.integers(1, 2))
    lossy = draw(st.booleans())
    state = [ZERO] * lbas
    resume = [0] * threads
    results = []
    for epoch in range(rounds):
        initial = dict(enumerate(state))
        events: list[dict[str, Any]] = [{"ev": "start", "t": 0, "epoch": epoch}]
        index = list(resume)
        phase = [0] * threads  # 0 idle, 1 invoked, 2 took effect
        observed: list[Decoded | None] = [None] * threads
        for t in range(1, draw(st.integers(0, 40)) + 1):
            th = draw(st.integers(0, threads - 1))
            kind, lba = op_at(SEED, th, index[th], lbas, MIX)
            base = {"epoch": epoch, "thread": th, "op": index[th], "kind": kind, "lba": lba}
            if phase[th] == 0:
                events.append({"ev": "invoke", "t": t, **base})
            elif phase[th] == 1:
                if kind == "read":
                    observed[th] = state[lba]
                else:
                    wid = WriteId(epoch, th, index[th])
                    state[lba] = Decoded("write", wid) if kind == "write" else ZERO
            else:
                ok = {"ev": "ok", "t": t, **base}
                if kind == "read":
                    ok["value"] = observed[th].to_json()
                events.append(ok)
                index[th] += 1
            phase[th] = (phase[th] + 1) % 3
        # A lossy channel drops any tail of the stream; a synchronous one loses nothing.
        received = events[: draw(st.integers(1, len(events)))] if lossy else events
        config = {
            "seed": SEED,
            "epoch": epoch,
            "threads": threads,
            "lbas": lbas,
            "mix": MIX,
            "resume": list(resume),
        }
        recovery = {"ok": True, "blocks": {str(i): v.to_json() for i, v in enumerate(state)}}
        results.append((config, received, recovery, initial, 1000 if lossy else 0))
        resume = [i + 1 for i in index]  # the next round starts past any op cut short
    return results


@settings(max_examples=400, deadline=None)
@given(register_runs())
def test_simulated_atomic_register_is_never_judged_a_violation(runs) -> None:
    for config, events, recovery, initial, unseen_ops in runs:
        verdict = judge(config, events, recovery, initial, unseen_ops)
        assert verdict.ok, verdict.to_json()


def test_surviving_zero_explained_by_a_zero_op_the_host_never_saw() -> None:
    h = History(threads=1, resume=[0])
    h.write(0, 10)
    assert h.judge(ZERO, unseen_ops=50).ok
    assert kinds(h.judge(ZERO)) == ["lost-ack"]


def test_unseen_ops_never_exceed_the_rounds_op_budget() -> None:
    h = History(threads=1, resume=[0])
    h.write(0, 10)
    config = {
        "seed": SEED,
        "epoch": 0,
        "threads": 1,
        "lbas": 2,
        "mix": MIX,
        "resume": [0],
        "ops": 1,
    }
    recovery = {"ok": True, "blocks": {"0": ZERO.to_json(), "1": ZERO.to_json()}}
    assert not judge(config, h.events, recovery, unseen_ops=50).ok


def test_next_resume_skips_every_op_seen_invoked() -> None:
    h = History()
    h.write(0, 10, thread=0)
    last = h.invoke(20, 0, "write", 1)  # cut short: its index must not be reused
    assert next_resume(h.events, [0, 5]) == [last + 1, 5]
