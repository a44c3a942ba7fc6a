"""`python3 -m tbagent COMMAND` with the command's config as one JSON object on stdin.

prepare           {"target": T, "lbas": N}
                  -> {"ok": true, "nblock": n}
workload          {"target": T, "seed": S, "epoch": E, "threads": k, "lbas": N,
                   "mix": {"read": w, "write": w, "zero": w}, "ops": n | "duration_s": s,
                   "resume": [first op index per thread] (default all 0), "events": PATH}
                  -> {"ok": bool, "errors": [...]}; events stream to PATH as JSON lines:
                  start; per op invoke then ok | fail (OSError) | died (any other exception,
                  with the traceback); per thread end (it finished its ops or the duration);
                  done
                  with "at_step": {"label", "thread" (null: any), "nth", "hold_s"} (btt8
                  only) every op runs through btt8.steps and the nth arrival at the label
                  writes a pause event and holds there (tbagent.atstep)
create            {"target": T (btt8), "seed": S, "epoch": E, "events": PATH, "at_step"?}
                  -> {"ok": true}: formats the pool through btt8.steps.create_steps under the
                  target's persistence model, for a cut during create; events start, pause, done
recover-and-dump  {"target": T, "seed": S, "lbas": N}
                  -> {"ok": true, "checked": bool (btt8 read-only check ran), "check_s": s,
                      "nblock": n, "blocks": {"<lba>": VALUE}}
                  | {"ok": false, "error": str, "not_a_pool": bool (no signature: no pool)}
T = {"kind": "btt8" | "kernel-btt" | "raw-pmem" | "btt8-blk", "path": str, "bsize": int,
     "pool_mib": int (prepare of a btt8 pool file only),
     "client": "fio" | "ext4" (block devices; absent: this agent's workload; the three commands
               then run tbagent.clients, whose docstring has their configs and results)}
VALUE = {"kind": "zero"} | {"kind": "write", "write_id": [epoch, thread, op]}
      | {"kind": "torn", "digest": hex} | {"kind": "phantom", "write_id": [...], "lba": other}
Exit status: 0 when the JSON result was printed (its "ok" carries the outcome), 2 when the
config is unusable (a testbed bug).
"""

import json
import sys

from tbagent.agent import COMMANDS, TEST_FAULT, ConfigError


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:  # the resident agent (tbagent/serve.py)
        from tbagent.serve import main as serve

        return serve(argv[1:])
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: python3 -m tbagent {{{','.join(COMMANDS)}}} < config.json", file=sys.stderr)
        return 2
    try:
        config = json.load(sys.stdin)
        result = COMMANDS[argv[0]](config)
    except (ConfigError, KeyError, TypeError, json.JSONDecodeError) as e:
        print(f"tbagent {argv[0]}: bad config: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if TEST_FAULT == "garbage-output" and argv[0] == "recover-and-dump":
        print("Segmentation fault (test fault garbage-output)")
        return 0
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
