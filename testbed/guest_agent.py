"""The host side of the guest agent: stage and deploy guest/{btt8,tbagent}, run its commands.

Each command takes one JSON object on stdin and prints one JSON object on stdout (see
guest/tbagent/__main__.py); scenario values reach the guest only that way, never in a shell
string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from testbed.vm import VM, CommandFailed

GUEST_ROOT = "/opt/testbed"  # deployed guest packages (btt8, tbagent); PYTHONPATH there
GUEST_PACKAGES = Path(__file__).resolve().parent.parent / "guest"

log = logging.getLogger(__name__)


class AgentError(Exception):
    """The agent answered with something that is not its protocol (a testbed failure)."""


def stage(dst: Path) -> tuple[Path, str]:
    """A clean copy of guest/{btt8,tbagent} (no caches) and the hash of its content."""
    digest = hashlib.sha256()
    for package in ("btt8", "tbagent"):
        for src in sorted((GUEST_PACKAGES / package).rglob("*.py")):
            rel = src.relative_to(GUEST_PACKAGES)
            data = src.read_bytes()
            digest.update(str(rel).encode() + b"\0" + data)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(data)
    content = digest.hexdigest()
    (dst / "CONTENT_SHA256").write_text(content + "\n")
    return dst, content


class Agent:
    """`python3 -m tbagent` in one guest, with the staged packages deployed on demand.

    env: extra environment for the agent (tests only: TBAGENT_TEST_FAULT, BTT8_TEST_FAULT)."""

    def __init__(self, staged: Path, content_hash: str, env: dict[str, str] | None = None) -> None:
        self.staged, self.content_hash = staged, content_hash
        self.env = dict(env or {})

    def deploy(self, vm: VM) -> None:
        """Copy the packages into the guest unless it already has this exact content."""
        have = vm.execute("cat", f"{GUEST_ROOT}/CONTENT_SHA256").stdout.strip()
        if have == self.content_hash:
            return
        log.info("deploying guest packages %s to %s", self.content_hash[:12], GUEST_ROOT)
        vm.succeed("rm", "-rf", GUEST_ROOT)
        vm.ssh().put_dir(self.staged, GUEST_ROOT)

    def argv(self, command: str) -> list[str]:
        env = [f"{k}={v}" for k, v in sorted({"PYTHONPATH": GUEST_ROOT, **self.env}.items())]
        return ["env", *env, "python3", "-m", "tbagent", command]

    def run(self, vm: VM, command: str, config: dict[str, Any],
            timeout: float) -> dict[str, Any]:
        """One agent command to completion; its JSON answer. A timeout raises VMTimeout."""
        r = vm.execute(*self.argv(command), timeout=timeout, stdin=json.dumps(config).encode())
        if r.rc != 0:
            raise CommandFailed(f"guest agent {command} failed", r)
        try:
            answer = json.loads(r.stdout)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AgentError(f"guest agent {command} printed no JSON object: "
                             f"{r.stdout[-300:]!r} (stderr: {r.stderr[-300:]!r})")
        return answer

    def start(self, vm: VM, command: str, config: dict[str, Any],
              timeout: float) -> Background:
        return Background(vm, self.argv(command), config, timeout)


class Background:
    """An agent command on its own thread (the workload: it ends when the power does)."""

    def __init__(self, vm: VM, argv: list[str], config: dict[str, Any], timeout: float) -> None:
        self.error: str | None = None
        self.finished = False
        self._thread = threading.Thread(
            target=self._run, args=(vm, argv, json.dumps(config).encode(), timeout),
            name="workload", daemon=True)
        self._thread.start()

    def _run(self, vm: VM, argv: list[str], stdin: bytes, timeout: float) -> None:
        try:
            r = vm.execute(*argv, timeout=timeout, stdin=stdin)
            if r.rc != 0:
                self.error = f"rc {r.rc}: {r.stderr[-2000:]}"
        except Exception as e:  # the cut drops the connection: expected, judged elsewhere
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished = True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
