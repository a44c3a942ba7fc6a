"""Security by default, each property a test. VM tests share ONE booted guest (the module's
`booted` fixture): the guest cannot open connections out, forwards listen on 127.0.0.1 only,
SSH refuses a changed guest host key, the QMP socket's folder and the keys are the owner's
alone. Host tests: run state is private, results meant for sharing get the user's umask mode."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testbed import runtime
from testbed.image import HOST_KEY_ALIAS, Image
from testbed.oracle import judge
from testbed.report import publish
from testbed.results import RunResults
from testbed.scenario import load_scenario
from testbed.ssh import HostKeyMismatch, SSHConnection, plain_ssh_argv
from testbed.vm import VM

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scenarios" / "smoke.yaml"

# Run in the guest with values only in argv: connect to each host:port, report what happened.
CONNECT_PY = r"""
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        out[target] = "connected"
    except OSError as e:
        out[target] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
try:  # a DNS query for example.com to slirp's resolver: must get no answer
    u.sendto(bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001"),
             ("10.0.2.3", 53))
    u.recvfrom(512)
    out["udp 10.0.2.3:53"] = "answered"
except OSError as e:
    out["udp 10.0.2.3:53"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _non_loopback_addresses() -> list[str]:
    """This host's addresses other than loopback (those a default route would use)."""
    found = set()
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect((probe, 9))  # UDP: no packet is sent, only a route is chosen
            found.add(s.getsockname()[0])
        except OSError:
            pass
        finally:
            s.close()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127.") and a not in ("::1", "::"))


def _listeners(port: int) -> list[tuple[str, str]]:
    """(table, local address hex) of every LISTEN socket on `port` (/proc/net/tcp{,6})."""
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                out.append((table, address))
    return out


# --- VM: one shared guest -----------------------------------------------------------------


@pytest.fixture(scope="module")
def host_listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's loopback: what 10.0.2.2:port reaches from an unrestricted
    user-mode network. The guest must not get to it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.setblocking(False)
    yield s
    s.close()


@pytest.mark.vm
def test_guest_cannot_open_connections_out(booted: VM, host_listener: socket.socket) -> None:
    port = host_listener.getsockname()[1]
    targets = [f"10.0.2.2:{port}", "10.0.2.2:22", "10.0.2.3:53", "1.1.1.1:443",
               "8.8.8.8:53", "93.184.215.14:80"]
    out = json.loads(booted.succeed("python3", "-c", CONNECT_PY, *targets, timeout=120))
    routes = booted.execute("ip", "route").stdout
    # The guest does have a route out, so each refusal is the user network's restriction
    # (slirp answers every outbound connect with a reset, even to the listening loopback port).
    assert "default via 10.0.2.2" in routes, routes
    assert set(out) == {*targets, "udp 10.0.2.3:53"}, out
    for target, outcome in out.items():
        assert outcome not in ("connected", "answered"), (target, outcome, routes)
    with pytest.raises(BlockingIOError):
        host_listener.accept()  # nothing reached the host either


@pytest.mark.vm
def test_forwards_listen_on_loopback_only(booted: VM) -> None:
    argv = booted.argv
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs, argv
    for netdev in netdevs:
        options = netdev.split(",")
        assert "restrict=on" in options, netdev
        forwards = [o for o in options if o.startswith(("hostfwd=", "guestfwd="))]
        assert forwards and all(o.startswith("hostfwd=tcp:127.0.0.1:") for o in forwards), netdev
    port = booted.ssh_port
    assert port is not None
    listeners = _listeners(port)
    assert listeners == [("tcp", "0100007F")], listeners  # 127.0.0.1, and no IPv6 socket
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the forward itself works
    for address in _non_loopback_addresses():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            with pytest.raises(OSError):
                s.connect((address, port))
        finally:
            s.close()


def _other_host_key(tmp_path: Path) -> Path:
    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = tmp_path / "known_hosts"
    path.write_bytes(f"{HOST_KEY_ALIAS} ".encode() + public + b"\n")
    return path


@pytest.mark.vm
def test_ssh_refuses_a_changed_guest_host_key(booted: VM, image: Image, tmp_path: Path) -> None:
    port = booted.ssh_port
    assert port is not None
    changed = _other_host_key(tmp_path)
    conn = SSHConnection(port, image.client_key, changed)
    with pytest.raises(HostKeyMismatch):
        conn.connect(timeout=30)
    # The same with the pinned key connects: the refusal is the key's doing.
    good = SSHConnection(port, image.client_key, image.known_hosts)
    good.connect(timeout=30)
    good.close()
    assert shutil.which("ssh"), "the OpenSSH client is missing (bin/bootstrap installs it)"
    batch = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    bad = plain_ssh_argv(port, image.client_key, changed)
    result = subprocess.run([*bad[:-1], *batch, bad[-1], "--", "true"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 255, result
    assert "host key" in result.stderr.lower() or "identification has changed" in (
        result.stderr.lower()), result.stderr
    ok = plain_ssh_argv(port, image.client_key, image.known_hosts)
    result = subprocess.run([*ok[:-1], *batch, ok[-1], "--", "true"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr


@pytest.mark.vm
def test_qmp_socket_folder_and_keys_are_the_owners_alone(booted: VM, image: Image) -> None:
    state = booted.paths.dir
    assert _mode(state) & 0o077 == 0, oct(_mode(state))
    assert booted.paths.qmp_socket.is_socket()
    assert booted.paths.qmp_socket.parent == state
    assert os.stat(state).st_uid == os.getuid()
    keys = image.client_key.parent
    assert _mode(keys) & 0o077 == 0, oct(_mode(keys))
    for private in (image.client_key, keys / "ssh_host_ed25519_key"):
        assert _mode(private) & 0o077 == 0, (private, oct(_mode(private)))


# --- host: run state private, shared results at the user's umask -------------------------


def test_run_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state_dir = tmp_path / "g"
        state_dir.mkdir(mode=0o700)
        runtime.save(runtime.GuestState(
            name="g", pid=1, ssh_port=2222, accel="tcg", state_dir=str(state_dir),
            qmp_socket=str(state_dir / "qmp.sock"), console_log="", client_key="",
            known_hosts="", image="", started_at=0.0, boot_seconds=0.0))
    finally:
        os.umask(old)
    assert _mode(state_dir / "state.json") == 0o600


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_shared_results_get_the_users_umask_mode(tmp_path: Path, umask: int,
                                                 expected: int) -> None:
    config = {"seed": 1, "epoch": 0, "threads": 1, "lbas": 1, "mix": {"write": 1.0}}
    torn = {"ok": True, "blocks": {"0": {"kind": "torn", "digest": "ab"}}}
    old = os.umask(umask)
    try:
        run = RunResults.create(tmp_path, load_scenario(SMOKE), SMOKE, {}, run_id="r")
        image = tmp_path / "crash.img"
        image.write_bytes(b"x" * 4096)
        run.record_cut(1, judge(config, [], torn).to_json(), {"workload": 1.0},
                       crash_image=image)
        run.finish()
        publish(run.run_dir)
    finally:
        os.umask(old)
    d = run.run_dir
    for name in ("report.html", "junit.xml", "summary.json", "manifest.json", "scenario.yaml",
                 "cut-1/verdict.json", "cut-1/crash.img"):
        assert _mode(d / name) == expected, (name, oct(_mode(d / name)))
