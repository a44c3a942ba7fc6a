"""One QEMU guest: process lifecycle (this module) over QMP protocol (QMPChannel) and SSH
(testbed.ssh). The command line itself comes from testbed.qemu_cmdline.

    with VM(VMConfig(name="t", kernel=..., initrd=..., root_disk=..., nvdimms=[...])) as vm:
        vm.start()
        vm.wait_for_ssh(60)
        print(vm.succeed("ndctl", "list"))

Launch phases: _pre_launch (state dir, accelerator, overlay, NVDIMM backings), _launch (QEMU in
its own process group, killed if its launching thread dies unless daemonized), _post_launch
(QMP), and cleanup(). A daemonized VM (`testbed up`) outlives the CLI process on purpose: it
gets no parent-death signal and is stopped by `testbed down` through its pid/QMP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from qemu.qmp import EventListener, QMPClient
from qemu.qmp import QMPError as _LibQMPError

from testbed import accel as accel_mod
from testbed.nvdimm import create_backing
from testbed.qemu_cmdline import (
    DEFAULT_APPEND,
    QEMU_BINARY,
    ConfigError,
    QemuCommandLine,
    RunPaths,
    SerialPort,
    VMConfig,
)
from testbed.ssh import HostKeyMismatch, Result, SSHConnection, SSHError, SSHTimeout

if TYPE_CHECKING:
    from testbed.image import Image

__all__ = [
    "DEFAULT_APPEND", "VM", "CommandFailed", "ConfigError", "GuestCommands", "QMPChannel",
    "QMPError", "RunPaths", "SerialPort", "VMConfig", "VMError", "VMLaunchError", "VMTimeout",
    "free_port",
]

QMP_TIMEOUT = 10.0

log = logging.getLogger(__name__)


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """First line of `qemu-system-x86_64 --version` (VMLaunchError when it cannot run)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise VMLaunchError(f"cannot run {binary} --version: {e} (run bin/bootstrap)") from e
    return out.splitlines()[0] if out else "unknown"


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class VMError(Exception):
    """A VM failure, with what is needed to diagnose it without rerunning."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr_tail: str = "",
                 console_tail: str = "") -> None:
        self.message = message
        self.argv = list(argv)
        self.stderr_tail = stderr_tail
        self.console_tail = console_tail
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.argv:
            parts.append("command line: " + shlex.join(self.argv))
        if self.stderr_tail:
            parts.append("QEMU stderr (last lines):\n" + self.stderr_tail)
        if self.console_tail:
            parts.append("guest console (last lines):\n" + self.console_tail)
        return "\n".join(parts)


class VMLaunchError(VMError):
    """QEMU did not start or exited during start-up."""


class VMTimeout(VMError):
    """A deadline passed (boot, ssh, shutdown, a guest command)."""


class QMPError(VMError):
    """A QMP command failed or QMP is unreachable."""


class CommandFailed(VMError):
    """A guest command's exit status was not the expected one."""

    def __init__(self, message: str, result: Result, **kw: Any) -> None:
        self.result = result
        super().__init__(
            f"{message}: {shlex.join(result.argv)} -> rc {result.rc}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}", **kw)


def _port_taken(stderr: str) -> bool:
    """QEMU could not bind the SSH forward ("Could not set up host forwarding rule")."""
    return "host forwarding rule" in stderr or "hostfwd" in stderr


def free_port() -> int:
    """A currently free 127.0.0.1 TCP port (QEMU binds it a moment later; collisions retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QMPChannel:
    """Synchronous facade over qemu.qmp's asyncio client, on its own event-loop thread so QMP
    events are logged (with timestamps) while the caller blocks elsewhere."""

    def __init__(self, socket_path: Path, event_log: Path) -> None:
        self.socket_path = socket_path
        self.event_log = event_log
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"qmp-{socket_path.parent.name}")
        self._thread.start()
        self._client = QMPClient(socket_path.parent.name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._events_task: asyncio.Task[None] | None = None

    def _run(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return fut.result(timeout + 1.0)
        except TimeoutError as e:
            fut.cancel()
            raise TimeoutError(f"QMP call timed out after {timeout} s") from e

    async def _log_events(self) -> None:
        with open(self.event_log, "a", buffering=1) as f:
            async for event in self._listener:
                f.write(json.dumps({"host_time": time.time(), **dict(event)}) + "\n")

    async def _connect(self) -> None:
        await self._client.connect(str(self.socket_path))
        self._events_task = asyncio.create_task(self._log_events())

    async def _disconnect(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        await self._client.disconnect()

    def connect(self, timeout: float) -> None:
        self._run(self._connect(), timeout)

    def execute(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = QMP_TIMEOUT) -> Any:
        return self._run(self._client.execute(cmd, args), timeout)

    def close(self) -> None:
        """Disconnect, then cancel whatever still runs on the loop (a QEMU that died leaves the
        client's tasks pending) so no task is left to be destroyed at garbage collection."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._disconnect(), 5.0)
        with contextlib.suppress(Exception):
            self._run(_cancel_pending(), 5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_pending() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class GuestCommands:
    """Verbs a test reads aloud, over one `execute` (SSH for a VM, the agent's port for the
    cut loop): succeed, fail, wait_until_succeeds."""

    def execute(self, *argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> Result:
        raise NotImplementedError

    def succeed(self, *argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> str:
        """Run argv in the guest; its stdout, or CommandFailed with rc/stdout/stderr."""
        r = self.execute(*argv, timeout=timeout, stdin=stdin)
        if r.rc != 0:
            raise CommandFailed("guest command failed", r)
        return r.stdout

    def fail(self, *argv: str, timeout: float = 60.0) -> str:
        """Run argv expecting a non-zero status; its stderr."""
        r = self.execute(*argv, timeout=timeout)
        if r.rc == 0:
            raise CommandFailed("guest command unexpectedly succeeded", r)
        return r.stderr

    def wait_until_succeeds(self, *argv: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            r = self.execute(*argv, timeout=max(1.0, deadline - time.monotonic()))
            if r.rc == 0:
                return r.stdout
            if time.monotonic() >= deadline:
                raise CommandFailed(f"guest command did not succeed within {timeout} s", r)
            time.sleep(0.5)


class VM(GuestCommands):
    """One QEMU process. Not thread-safe; launch it from a thread that outlives it (the
    parent-death signal follows the launching thread)."""

    def __init__(self, config: VMConfig, state_dir: Path | None = None, *,
                 client_key: Path | None = None, known_hosts: Path | None = None,
                 daemonize: bool = False, binary: str | None = None) -> None:
        self.config = config
        self.paths = RunPaths(state_dir or Path(tempfile.mkdtemp(prefix=f"testbed-{config.name}-")))
        self.client_key = client_key
        self.known_hosts = known_hosts
        self.daemonize = daemonize
        self.binary = binary or shutil.which(QEMU_BINARY) or QEMU_BINARY
        self.accel: str | None = None
        self.ssh_port: int | None = None
        self.argv: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._qmp: QMPChannel | None = None
        self._ssh: SSHConnection | None = None
        self.launched_at: float | None = None

    @classmethod
    def from_image(cls, image: Image, name: str, state_dir: Path | None = None, *,
                   daemonize: bool = False, **config: Any) -> VM:
        """A VM booting `image` (kernel, initrd, root disk, keys); `config`: other VMConfig
        fields (memory_mib, smp, accel, nvdimms, serial_ports, append)."""
        return cls(VMConfig(name=name, kernel=image.kernel, initrd=image.initrd,
                            root_disk=image.root_disk, **config),
                   state_dir, client_key=image.client_key, known_hosts=image.known_hosts,
                   daemonize=daemonize)

    # --- diagnostics ---

    def console_tail(self, n: int = 40) -> str:
        return _tail(self.paths.console_log, n)

    def stderr_tail(self, n: int = 20) -> str:
        return _tail(self.paths.stderr_log, n)

    def _err(self, cls: type[VMError], message: str) -> VMError:
        return cls(message, argv=self.argv, stderr_tail=self.stderr_tail(),
                   console_tail=self.console_tail())

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle ---

    @property
    def overlay(self) -> Path:
        return self.config.root_overlay or self.paths.overlay

    def start(self, *, paused: bool = False, launch_attempts: int = 10) -> None:
        """Launch QEMU and connect QMP. Returns once QEMU runs the guest (not yet booted), or
        with `paused`, once QEMU is ready and the vCPUs wait for `cont` (to load a snapshot)."""
        self.paused = paused
        if self.process is not None:
            raise VMLaunchError("VM already started", argv=self.argv)
        self._pre_launch()
        for attempt in range(launch_attempts):
            try:
                self._launch()
                self._post_launch()
                return
            except VMLaunchError:
                self._reap()  # QEMU has exited now: its stderr is complete
                # Another process took the port between free_port() and QEMU's bind: retry
                # with another port. Decided from the whole stderr, read after the exit.
                if not _port_taken(self.stderr_tail(50)) or attempt == launch_attempts - 1:
                    self.cleanup()
                    raise
            except BaseException:
                self.kill()
                self.cleanup()
                raise

    def _pre_launch(self) -> None:
        c = self.config
        self.paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.paths.dir, 0o700)  # QMP socket inside: private to this user
        for p in (c.kernel, c.initrd, c.root_disk):
            if not Path(p).is_file():
                raise VMLaunchError(f"missing image file {p} (testbed image build)")
        if shutil.which(self.binary) is None:
            raise VMLaunchError(f"QEMU binary {self.binary} not found (run bin/bootstrap)")
        self.accel = accel_mod.resolve(c.accel, c.kernel, c.initrd, self.binary)
        if c.root_overlay is None or not c.root_overlay.exists():
            self.overlay.unlink(missing_ok=True)
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                 "-b", str(Path(c.root_disk).resolve()), str(self.overlay)],
                check=True, capture_output=True,
            )
        for d in c.nvdimms:
            create_backing(d)
        for port in c.serial_ports:
            port.path.parent.mkdir(parents=True, exist_ok=True)

    def _launch(self) -> None:
        # A socket left by a QEMU that failed to start would be taken for the new one's.
        for f in (self.paths.qmp_socket, self.paths.pidfile):
            f.unlink(missing_ok=True)
        self.ssh_port = free_port()
        assert self.accel is not None
        self.argv = QemuCommandLine(self.config, self.paths, accel=self.accel,
                                    ssh_port=self.ssh_port, binary=self.binary,
                                    paused=self.paused).argv()
        # Unless daemonized, setpriv gives QEMU a parent-death signal before it execs QEMU: if
        # this process dies, even by SIGKILL, its QEMU dies too (no Python runs in the child).
        wrapper = [] if self.daemonize else ["setpriv", "--pdeathsig", "KILL", "--"]
        log.info("launching %s", shlex.join(self.argv))
        with open(self.paths.stderr_log, "wb") as err:
            try:
                self.process = subprocess.Popen(
                    wrapper + self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True,  # own process group: signals to ours miss it
                )
            except OSError as e:
                raise self._err(VMLaunchError, f"cannot execute QEMU: {e}") from e
        self.launched_at = time.monotonic()

    def _post_launch(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while not self.paths.qmp_socket.exists():
            if self.process.poll() is not None:
                raise self._err(VMLaunchError, f"QEMU exited during start-up "
                                               f"(rc {self.process.returncode})")
            if time.monotonic() > deadline:
                raise self._err(VMLaunchError, "QEMU did not create its QMP socket")
            time.sleep(0.02)
        self._qmp = QMPChannel(self.paths.qmp_socket, self.paths.qmp_log)
        try:
            # The handshake completes only once QEMU's main loop runs: init is done.
            self._qmp.connect(max(1.0, deadline - time.monotonic()))
        except Exception as e:
            self._qmp.close()
            self._qmp = None
            time.sleep(0.1)
            if self.process.poll() is not None:
                raise self._err(VMLaunchError, f"QEMU exited during start-up "
                                               f"(rc {self.process.returncode})") from e
            raise self._err(VMLaunchError, f"cannot connect QMP: {e!r}") from e

    def ssh(self) -> SSHConnection:
        if self.client_key is None or self.known_hosts is None or self.ssh_port is None:
            raise VMError("VM has no SSH keys/port configured")
        if self._ssh is None:
            self._ssh = SSHConnection(self.ssh_port, self.client_key, self.known_hosts)
        return self._ssh

    def wait_for_ssh(self, timeout: float = 60.0) -> float:
        """Block until SSH accepts our key; return seconds since launch. Fails fast if QEMU dies,
        and with the console tail on timeout (a guest that never boots)."""
        deadline = time.monotonic() + timeout
        guest = self.ssh()
        while True:
            if not self.is_running():
                raise self._err(VMError, "QEMU exited while waiting for SSH")
            if "Kernel panic" in self.console_tail(30):
                raise self._err(VMError, f"guest {self.config.name} kernel panicked while booting")
            try:
                guest.wait_ready(min(deadline, time.monotonic() + 2.0))
                return time.monotonic() - (self.launched_at or 0.0)
            except SSHError as e:
                if isinstance(e, HostKeyMismatch):
                    raise
                if time.monotonic() >= deadline:
                    raise self._err(VMTimeout, f"guest {self.config.name} not ssh-ready after "
                                               f"{timeout:g} s") from e

    def qmp(self, cmd: str, args: dict[str, Any] | None = None, *,
            timeout: float = QMP_TIMEOUT, **kwargs: Any) -> Any:
        """Run a QMP command; `args` for names with '-', kwargs for the rest."""
        if self._qmp is None:
            raise self._err(QMPError, "QMP not connected")
        merged = {**(args or {}), **kwargs} or None
        log.debug("QMP %s %s", cmd, json.dumps(merged) if merged else "")
        try:
            return self._qmp.execute(cmd, merged, timeout)
        except TimeoutError as e:
            raise self._err(QMPError, f"QMP {cmd} timed out after {timeout} s") from e
        except (_LibQMPError, OSError, EOFError) as e:
            raise self._err(QMPError, f"QMP {cmd} failed: {e}") from e

    # --- guest commands (argv lists; quoted with shlex.join by testbed.ssh) ---

    def execute(self, *argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> Result:
        """Run argv over SSH, connecting first if no connection is open yet (a guest restored
        from a snapshot is reached through its agent until something needs SSH)."""
        try:
            ssh = self.ssh()
            if not ssh.connected:
                ssh.wait_ready(time.monotonic() + timeout)
            return ssh.run(list(argv), timeout=timeout, stdin=stdin)
        except SSHError as e:
            if isinstance(e, SSHTimeout):
                raise self._err(VMTimeout, str(e)) from e
            raise

    # --- ending ---

    def crash(self, mode: Literal["quit", "kill", "reset"] = "quit") -> None:
        """Pull the plug. quit: QMP quit (QEMU exits now, no guest shutdown); kill: SIGKILL
        QEMU; reset: QMP system_reset (hard reset, QEMU keeps running; reconnect SSH)."""
        self._drop_ssh()
        if mode == "reset":
            self.qmp("system_reset")
            return
        if mode == "quit":
            with contextlib.suppress(QMPError):
                self.qmp("quit")
        elif mode == "kill":
            self.kill()
        else:
            raise ValueError(f"crash mode must be quit, kill or reset, not {mode!r}")
        self._wait_exit(10.0)
        self.cleanup()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Graceful: guest poweroff over SSH (sync, unmount), wait up to `timeout`, then QMP
        quit, then SIGKILL. Idempotent."""
        if self.is_running():
            if self._ssh is not None and self._ssh.connected:
                with contextlib.suppress(Exception):
                    self._ssh.run(["busybox", "poweroff"], timeout=5.0)
            self._drop_ssh()
            if not self._wait_exit(timeout):
                with contextlib.suppress(QMPError):
                    self.qmp("quit", timeout=5.0)
                if not self._wait_exit(5.0):
                    self.kill()
                    self._wait_exit(5.0)
        self.cleanup()

    def detach(self) -> None:
        """Let a daemonized VM run on without this process (`testbed up`): close QMP and SSH."""
        if not self.daemonize:
            raise VMError("only a daemonized VM may outlive its launcher")
        self._drop_ssh()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def _wait_exit(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _drop_ssh(self) -> None:
        if self._ssh is not None:
            self._ssh.close()

    def _reap(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self.kill()
        self._wait_exit(10.0)
        self.process = None

    def cleanup(self) -> None:
        """Close connections; SIGKILL QEMU if it still runs (never leave one behind). Logs stay."""
        self._drop_ssh()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.process is not None and self.process.poll() is None:
            self.kill()
            self._wait_exit(10.0)
        self.paths.qmp_socket.unlink(missing_ok=True)
        self.paths.overlay.unlink(missing_ok=True)  # a chain's root_overlay is kept

    def __enter__(self) -> VM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown(timeout=5.0) if exc is None else self.cleanup()

