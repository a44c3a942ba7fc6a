"""SSH into a guest (fabric over paramiko) with the guest's host key pinned: no TOFU, no
passwords.

The pinned key is stored under an alias (image.HOST_KEY_ALIAS) rather than host:port, because
every VM gets a different forwarded port; we install it for "[127.0.0.1]:port" at connect time
and reject anything else (RejectPolicy).
"""

from __future__ import annotations

import logging
import shlex
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import fabric
import paramiko

from testbed.image import HOST_KEY_ALIAS

# paramiko logs every refused early connection attempt as an ERROR traceback; our own errors
# carry what matters.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False
log = logging.getLogger(__name__)


class SSHError(Exception):
    """SSH-level failure talking to the guest."""


class HostKeyMismatch(SSHError):
    """The guest presented a host key other than the pinned one: refused."""


class SSHTimeout(SSHError):
    """The guest did not accept SSH (or a command did not finish) before the deadline."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


def pinned_key(known_hosts: Path, alias: str = HOST_KEY_ALIAS) -> paramiko.PKey:
    keys = paramiko.HostKeys(str(known_hosts)).lookup(alias)
    if not keys:
        raise SSHError(f"{known_hosts} has no host key for {alias}")
    return next(iter(keys.values()))


def plain_ssh_argv(port: int, client_key: Path, known_hosts: Path) -> list[str]:
    """The OpenSSH client command for root@127.0.0.1:port, with the same pinned host key."""
    return [
        "ssh", "-i", str(client_key), "-p", str(port),
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", f"HostKeyAlias={HOST_KEY_ALIAS}", "-o", "LogLevel=ERROR",
        "root@127.0.0.1",
    ]


def connection(port: int, client_key: Path, known_hosts: Path, host: str = "127.0.0.1",
               user: str = "root", timeout: float = 10.0,
               banner_timeout: float | None = None) -> fabric.Connection:
    """A fabric Connection (not yet open) to user@host:port that trusts only the guest's pinned
    host key: fabric's default policy adds unknown keys (AutoAddPolicy); it is replaced by
    RejectPolicy, no ~/.ssh config or known_hosts is read, no agent, no other key."""
    key = pinned_key(known_hosts)
    conn = fabric.Connection(
        host, user=user, port=port, connect_timeout=max(1, int(timeout)),
        # No ~/.ssh/config; a script's own stdin is not forwarded to the guest by default.
        config=fabric.Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}}),
        connect_kwargs={
            "pkey": paramiko.Ed25519Key.from_private_key_file(str(client_key)),
            "banner_timeout": banner_timeout or timeout, "auth_timeout": timeout,
            "allow_agent": False, "look_for_keys": False,
        },
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client.get_host_keys().add(f"[{host}]:{port}", key.get_name(), key)
    return conn


class SSHConnection:
    """One SSH connection to root@127.0.0.1:port: a fabric Connection with the host key pinned
    (`connection()`). Commands run on its paramiko transport directly: argv lists quoted with
    shlex.join, binary stdin, one deadline per command."""

    def __init__(self, port: int, client_key: Path, known_hosts: Path,
                 host: str = "127.0.0.1", user: str = "root") -> None:
        self.host, self.port, self.user = host, port, user
        self.client_key = client_key
        self.known_hosts = known_hosts
        self._conn: fabric.Connection | None = None

    def connect(self, timeout: float = 10.0, banner_timeout: float | None = None) -> None:
        conn = connection(self.port, self.client_key, self.known_hosts, self.host, self.user,
                          timeout, banner_timeout)
        try:
            conn.open()
        except paramiko.BadHostKeyException as e:
            conn.close()
            raise HostKeyMismatch(
                f"guest at {self.host}:{self.port} presented a host key that does not match "
                f"the pinned one in {self.known_hosts}: refused"
            ) from e
        except paramiko.SSHException as e:
            conn.close()
            if "not found in known_hosts" in str(e):
                raise HostKeyMismatch(f"guest host key type not pinned: {e}") from e
            raise
        except BaseException:
            conn.close()
            raise
        conn.client.get_transport().set_keepalive(5)  # type: ignore[union-attr]
        self._conn = conn

    def wait_ready(self, deadline: float) -> None:
        """Connect, retrying until time.monotonic() >= deadline. A host-key mismatch is final."""
        last: Exception | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SSHTimeout(f"ssh to {self.host}:{self.port} not ready: {last!r}")
            try:
                # While the guest's network is not up, QEMU's forward accepts and then stays
                # silent: a short banner wait keeps the polling fine-grained.
                self.connect(timeout=max(1.0, min(10.0, remaining)), banner_timeout=0.7)
                return
            except HostKeyMismatch:
                raise
            except (OSError, paramiko.SSHException, EOFError) as e:
                last = e
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def client(self) -> paramiko.SSHClient:
        if self._conn is None:
            raise SSHError("not connected")
        return self._conn.client

    @property
    def fabric(self) -> fabric.Connection:
        """The open fabric Connection (for `run`, `put`, `sudo`, ... in scripts)."""
        if self._conn is None:
            raise SSHError("not connected")
        return self._conn

    def run(self, argv: list[str] | tuple[str, ...], timeout: float = 60.0,
            stdin: bytes | None = None) -> Result:
        """Run argv (quoted with shlex.join: never a shell string) and capture its output."""
        argv = tuple(str(a) for a in argv)
        log.debug("ssh :%d %s", self.port, shlex.join(argv))
        chan = self.client.get_transport().open_session(timeout=timeout)  # type: ignore[union-attr]
        chan.settimeout(timeout)
        try:
            chan.exec_command(shlex.join(argv))
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            end = time.monotonic() + timeout
            while not (chan.exit_status_ready() and not chan.recv_ready()
                       and not chan.recv_stderr_ready()):
                if time.monotonic() > end:
                    raise SSHTimeout(f"guest command timed out after {timeout} s: "
                                     f"{shlex.join(argv)}")
                got = False
                if chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                if not got:
                    chan.status_event.wait(0.02)
            rc = chan.recv_exit_status()
        except TimeoutError as e:
            raise SSHTimeout(f"guest command timed out after {timeout} s: "
                             f"{shlex.join(argv)}") from e
        finally:
            chan.close()
        return Result(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def put_file(self, local: Path, remote: str, mode: int | None = None) -> None:
        with self.client.open_sftp() as sftp:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)

    def put_dir(self, local: Path, remote: str) -> None:
        """Copy a directory tree (files keep their permission bits)."""
        with self.client.open_sftp() as sftp:
            for src in sorted([local, *local.rglob("*")]):
                rel = src.relative_to(local).as_posix()
                dst = remote if rel == "." else f"{remote.rstrip('/')}/{rel}"
                if src.is_dir():
                    try:
                        sftp.mkdir(dst)
                    except OSError:
                        if not stat.S_ISDIR(sftp.stat(dst).st_mode or 0):
                            raise
                elif src.is_file():
                    sftp.put(str(src), dst)
                    sftp.chmod(dst, src.stat().st_mode & 0o7777)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
