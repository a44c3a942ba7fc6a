"""The host's agent channel against the real resident agent (`python3 -m tbagent serve`) on the
host: a unix socket stands in for QEMU's end of the virtio-serial port, a raw pty for the
guest's port device."""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import channel
from testbed.channel import AgentChannel


def _relay(host_side: socket.socket, guest_side: int, lose_first_line: bool) -> None:
    """QEMU's part: bytes from the host to the agent's port; the first request optionally lost,
    as the guest kernel discards what reaches a port nobody has open."""
    pending = b""
    while data := host_side.recv(1 << 16):
        if lose_first_line:
            pending += data
            if b"\n" not in pending:
                continue
            data, lose_first_line = pending.split(b"\n", 1)[1], False
        os.write(guest_side, data)


@pytest.fixture
def port(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """QEMU's listening socket; behind it the real agent serving a pty."""
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    guest_side, device = pty.openpty()
    tty.setraw(device)  # a port carries bytes: no echo, no line editing
    agent = subprocess.Popen([sys.executable, "-m", "tbagent", "serve", os.ttyname(device)])

    def accept() -> None:
        host_side, _ = listener.accept()
        threading.Thread(target=_relay, args=(host_side, guest_side, request.param),
                         daemon=True).start()
        with contextlib.suppress(OSError):  # the pty ends with the agent
            while data := os.read(guest_side, 1 << 16):  # the agent's answers to the host
                host_side.sendall(data)

    threading.Thread(target=accept, daemon=True).start()
    yield path
    agent.kill()
    agent.wait()
    listener.close()
    os.close(device)


@pytest.mark.parametrize("port", [False], indirect=True)
def test_connect_pings_the_agent_and_commands_run(port: Path) -> None:
    chan = AgentChannel(port)
    chan.connect(5.0)
    assert chan.succeed("echo", "hello").strip() == "hello"
    chan.close()


@pytest.mark.parametrize("port", [True], indirect=True)
def test_a_lost_ping_is_sent_again_not_waited_for_until_the_boot_timeout(
        port: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "PING_EVERY_S", 0.5)
    chan = AgentChannel(port)
    started = time.monotonic()
    chan.connect(30.0)
    assert time.monotonic() - started < 5.0  # the second ping answered, not the 30 s deadline
    assert chan.succeed("echo", "again").strip() == "again"
    chan.close()


def test_serve_fails_at_once_with_the_reason_when_the_port_cannot_be_opened(
        tmp_path: Path) -> None:
    """`serve --detach` reports a missing port to the SSH command that started it, instead of
    detaching first and leaving the host to time out on a ping nobody reads."""
    r = subprocess.run([sys.executable, "-m", "tbagent", "serve", str(tmp_path / "no-port"),
                        "--detach"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "no-port" in r.stderr and "No such file" in r.stderr
