"""The host side of the guest agent: stage and deploy guest/{btt8,tbagent}, start the resident
agent (guest/tbagent/serve.py) once per boot, run its commands over its port (testbed.channel).

Each command takes one JSON object and answers one JSON object; scenario values reach the
guest only that way, never in a shell string.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.channel import AgentChannel
from testbed.vm import VM

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

    def serve(self, vm: VM, port_device: str) -> None:
        """Start the resident agent on the guest's control port (once per boot, over SSH)."""
        vm.succeed(*self.argv("serve"), port_device, "--detach", timeout=60)

    def run(self, channel: AgentChannel, command: str, config: dict[str, Any],
            timeout: float) -> dict[str, Any]:
        """One agent command to completion; its JSON answer. A timeout raises VMTimeout."""
        answer = channel.call({"cmd": command, "config": config}, timeout)
        if "error" in answer or not isinstance(answer.get("result"), dict):
            raise AgentError(f"guest agent {command} failed: "
                             f"{str(answer.get('error', answer))[-2000:]}")
        return answer["result"]

    def start(self, channel: AgentChannel, command: str, config: dict[str, Any],
              timeout: float) -> Background:
        """An agent command on its own thread (the workload: it ends when the power does)."""
        return Background(lambda: self.run(channel, command, config, timeout))


class Background:
    """A call on its own thread; `finished` once it returned or raised (`error`)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.error: str | None = None
        self.finished = False
        self._thread = threading.Thread(target=self._run, args=(call,), name="workload",
                                        daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as e:  # the cut closes the port: expected, judged elsewhere
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished = True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
