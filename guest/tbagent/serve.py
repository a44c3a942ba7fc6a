"""`python3 -m tbagent serve PORT [--detach]`: the agent resident in the guest, answering the
host over a virtio-serial port (stdlib only).

Started once per boot, before the snapshot a snapshot restart takes, so every restored guest has
it already running and waiting: a command costs no SSH handshake and no Python start-up, which
under TCG are most of a cut's restart time. It keeps no pmem state between commands (a pool is
opened and closed inside each one), so it is safe inside a snapshot.

One JSON object per line each way, answered in order:
  {"id": n, "cmd": "ping"}                              -> {"id": n, "pong": true}
  {"id": n, "cmd": "run", "argv": [...], "timeout": s}  -> {"id": n, "rc", "stdout", "stderr"}
  {"id": n, "cmd": "prepare" | "workload" | "recover-and-dump", "config": {...}}
                                                        -> {"id": n, "result": {...}}
  anything that fails                                   -> {"id": n, "error": "..."}
`run` takes an argv list (no shell); its output is text (decoded with replacement).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import traceback
from typing import Any

from tbagent.agent import COMMANDS, TEST_FAULT, ConfigError


def handle(request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    answer: dict[str, Any] = {"id": request.get("id")}
    try:
        if cmd == "ping":
            answer["pong"] = True
        elif cmd == "run":
            r = subprocess.run([str(a) for a in request["argv"]], capture_output=True,
                               timeout=request.get("timeout"), check=False,
                               input=request.get("stdin", "").encode())
            answer.update(rc=r.returncode, stdout=r.stdout.decode(errors="replace"),
                          stderr=r.stderr.decode(errors="replace"))
        elif cmd in COMMANDS:
            answer["result"] = COMMANDS[cmd](request["config"])
        else:
            answer["error"] = f"unknown command {cmd!r}"
    except subprocess.TimeoutExpired as e:
        answer["error"] = f"timed out after {e.timeout} s: {e.cmd}"
    except (ConfigError, KeyError, TypeError, OSError) as e:
        answer["error"] = f"{type(e).__name__}: {e}"
    except Exception:
        answer["error"] = traceback.format_exc()[-3000:]
    return answer


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(fd: int) -> None:
    """Answer requests on the open port for ever. While the host side is not connected the
    port reports a hang-up: wait for it to come back (a restored guest meets a new QEMU)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    pending = b""
    while True:
        (_, events), = poller.poll()
        if not events & select.POLLIN:
            time.sleep(0.02)  # POLLHUP: no host connected yet
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            time.sleep(0.02)
            continue
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue  # a line the previous host left half-sent
            if not isinstance(request, dict):
                continue
            answer = handle(request)
            if TEST_FAULT == "garbage-output" and request.get("cmd") == "recover-and-dump":
                _write_all(fd, b"Segmentation fault (test fault garbage-output)\n")
                continue
            _write_all(fd, json.dumps(answer, separators=(",", ":")).encode() + b"\n")


def detach() -> None:
    """Leave the caller (an SSH session) at once: fork, new session, no inherited stdio."""
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--detach"):
        print("usage: python3 -m tbagent serve PORT [--detach]", file=sys.stderr)
        return 2
    # Open before detaching: the SSH command that starts the agent fails with the reason if the
    # port cannot be opened, and returns only once the port is open (so the host's first
    # request finds a reader).
    fd = os.open(argv[0], os.O_RDWR)
    if len(argv) == 2:
        detach()
    serve(fd)
    return 0
