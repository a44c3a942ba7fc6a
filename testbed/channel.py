"""The host end of the resident guest agent (guest/tbagent/serve.py) over a virtio-serial port.

QEMU serves the port's host side as a unix socket in the VM's private state directory
(`-chardev socket,server=on,wait=off`); this end connects to it and exchanges one JSON object
per line. The cut loop runs its guest commands here rather than over SSH: a guest restored
from a snapshot answers at once, with no SSH handshake and no Python start-up per command.
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any

from testbed.ssh import Result
from testbed.vm import GuestCommands, VMError, VMTimeout

log = logging.getLogger(__name__)
PING_EVERY_S = 2.0  # connect(): how long one ping may wait before the next is sent


class ChannelError(VMError):
    """The agent's port closed (QEMU exited, the guest died) or it answered out of protocol."""


class AgentChannel(GuestCommands):
    """Requests to the resident agent, answered in order; also a GuestCommands shell (`run`).

    Thread-safe: the workload's request waits on its own thread while the cut loop goes on.
    Whichever caller holds the read turn reads the port and files every answer under its id;
    `cancel_pending` (the power was cut, the guest may be rebooting in the same QEMU) makes
    the requests waiting at that moment give up."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._pending = b""
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._generation = 0  # bumped by cancel_pending
        self._cond = threading.Condition()
        self._reading = False

    def connect(self, timeout: float) -> None:
        """Connect to QEMU's socket (unless connected: QEMU keeps the connection across a guest
        reset) and wait until the agent answers a ping."""
        deadline = time.monotonic() + timeout
        while self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                self._sock = sock
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"cannot connect to the agent port "
                                       f"{self.socket_path}: {e}") from e
                time.sleep(0.02)
        # Ping again every PING_EVERY_S: a request that reached the port while the guest side
        # was not reading is gone (the guest kernel discards it), and must not cost boot_s.
        while True:
            remaining = deadline - time.monotonic()
            try:
                self.call({"cmd": "ping"}, max(0.1, min(PING_EVERY_S, remaining)))
                break
            except VMTimeout:
                if remaining <= PING_EVERY_S:
                    raise VMTimeout(f"guest agent ping timed out after {timeout:g} s") from None
        with self._cond:
            self._answers.clear()  # the pongs of earlier pings, if they came after all

    def cancel_pending(self) -> None:
        """Requests waiting now raise ChannelError; later ones are answered as usual."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request; its answer (VMTimeout past `timeout`, ChannelError if the port
        closes, the request is cancelled, or the agent answers out of protocol)."""
        with self._cond:
            if self._sock is None:
                raise ChannelError("agent port not connected")
            self._next_id += 1
            rid, generation, sock = self._next_id, self._generation, self._sock
        request = {**request, "id": rid}
        log.debug("agent %s", request.get("cmd") if request.get("cmd") != "run"
                  else "run " + shlex.join(request["argv"]))
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise ChannelError(f"agent port: {e}") from e
        with self._cond:
            while True:
                if rid in self._answers:
                    return self._answers.pop(rid)
                if self._generation != generation:
                    raise ChannelError(f"guest agent {request['cmd']}: cancelled (power cut)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VMTimeout(f"guest agent {request['cmd']} timed out after "
                                    f"{timeout:g} s")
                if self._reading:
                    self._cond.wait(min(remaining, 0.5))
                    continue
                self._reading = True
                self._cond.release()
                try:
                    self._read_some(sock, request["cmd"], min(remaining, 0.5))
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()

    def _read_some(self, sock: socket.socket, cmd: str, wait: float) -> None:
        """One read from the port; every complete answer filed under its id."""
        sock.settimeout(wait)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return
        except OSError as e:
            raise ChannelError(f"agent port: {e}") from e
        if not data:
            raise ChannelError(f"the agent port closed during {cmd} "
                               f"(QEMU exited or the guest died)")
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            try:
                answer = json.loads(line)
            except ValueError as e:
                raise ChannelError(f"the guest agent answered {cmd} with something that is "
                                   f"not JSON: {line[:300]!r}") from e
            if isinstance(answer, dict) and isinstance(answer.get("id"), int):
                with self._cond:
                    self._answers[answer["id"]] = answer

    def execute(self, *argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> Result:
        answer = self.call({"cmd": "run", "argv": list(argv), "timeout": timeout,
                            "stdin": (stdin or b"").decode()}, timeout + 5)
        if "error" in answer:
            if answer["error"].startswith("timed out"):
                raise VMTimeout(f"guest command {shlex.join(argv)}: {answer['error']}")
            raise ChannelError(f"guest command {shlex.join(argv)}: {answer['error']}")
        return Result(tuple(argv), answer["rc"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        with self._cond:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
