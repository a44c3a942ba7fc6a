"""Oracle benchmark: one busy LBA, the pathological shape for a linearizability search.

`python -m testbed.oracle_bench [--ops 100000]` builds a round of a simulated atomic register on
ONE LBA: thread 0's first op is a write that fails at once (indeterminate, never observed, so
never needed in the order), while the other threads run `--ops` overlapping reads, writes and
zeros. It judges the round twice, as recovered (clean) and with an acknowledged write rolled
back (a lost-ack the search must prove by exhausting every state), and prints the seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from tbagent.payload import ZERO, Decoded, WriteId, op_at

from testbed.oracle import judge

SEED = 7
MIX = {"read": 4.0, "write": 5.0, "zero": 1.0}


def busy_lba_round(ops: int, threads: int = 4, seed: int = 1
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], Decoded, Decoded]:
    """(workload config, events, the survivor, an acked write's older value for a lost-ack).

    Every op takes effect at a random instant inside its interval; reads observe the register
    at theirs, so the round is linearizable with the final value as its survivor."""
    rng = random.Random(seed)
    resume = [0] * threads
    config: dict[str, Any] = {"seed": SEED, "epoch": 1, "threads": threads, "lbas": 1,
                              "mix": MIX, "resume": resume}
    events: list[dict[str, Any]] = [{"ev": "start", "t": 0, "epoch": 1}]
    timeline: list[tuple[int, int, str, dict[str, Any]]] = []  # (t, order, what, base)
    # Thread 0: its first write fails at once; the thread stops (as the agent's does).
    index = 0
    while op_at(SEED, 0, index, 1, MIX)[0] != "write":
        index += 1
    resume[0] = index
    base0 = {"epoch": 1, "thread": 0, "op": index, "kind": "write", "lba": 0}
    events += [{"ev": "invoke", "t": 1, **base0},
               {"ev": "fail", "t": 2, **base0, "error": "EIO"}]
    per_thread = -(-ops // (threads - 1))
    for thread in range(1, threads):
        t = rng.randint(1, 5)
        for op in range(per_thread):
            kind, lba = op_at(SEED, thread, op, 1, MIX)
            base: dict[str, Any] = {"epoch": 1, "thread": thread, "op": op, "kind": kind,
                                    "lba": lba}
            effect = t + rng.randint(1, 6)
            ok = effect + rng.randint(1, 6)
            timeline.append((effect, thread, "effect", base))
            events.append({"ev": "invoke", "t": t, **base})
            events.append({"ev": "ok", "t": ok, **base})
            t = ok + rng.randint(0, 3)
    value, acked_values = ZERO, []
    observed: dict[tuple[int, int], Decoded] = {}
    for _, _, _, base in sorted(timeline, key=lambda x: (x[0], x[1])):
        if base["kind"] == "read":
            observed[(base["thread"], base["op"])] = value
        else:
            wid = WriteId(1, base["thread"], base["op"])
            value = Decoded("write", wid) if base["kind"] == "write" else ZERO
            if base["kind"] == "write":
                acked_values.append(value)
    for e in events:
        if e["ev"] == "ok" and e["kind"] == "read":
            e["value"] = observed[(e["thread"], e["op"])].to_json()
    events.sort(key=lambda e: e["t"])
    return config, events, value, acked_values[len(acked_values) // 2]


def bench(ops: int) -> dict[str, Any]:
    config, events, survivor, rolled_back = busy_lba_round(ops)
    out: dict[str, Any] = {"ops": ops, "lba": 0, "threads": config["threads"]}
    for name, value in (("clean", survivor), ("lost_ack", rolled_back)):
        recovery = {"ok": True, "blocks": {"0": value.to_json()}}
        start = time.perf_counter()
        verdict = judge(config, events, recovery)
        out[f"{name}_s"] = round(time.perf_counter() - start, 3)
        out[f"{name}_verdict"] = verdict.counts() or "ok"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.oracle_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000, help="ops on the one LBA")
    args = parser.parse_args(argv)
    print(json.dumps(bench(args.ops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
