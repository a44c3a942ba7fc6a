"""Per-user state of guests started by `testbed up`, which outlive the CLI process.

Each guest has a 0700 directory <runtime>/<name>/ holding state.json (pid, ports, paths), the
QMP socket, console and QMP-event logs. NVDIMM backing files live elsewhere (data_dir) so that
`testbed down` + `testbed up` keeps the media.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.qemu_cmdline import NAME_RE


def runtime_root() -> Path:
    """$TESTBED_RUNTIME_DIR, else $XDG_RUNTIME_DIR/testbed, else ~/.cache/testbed/run."""
    env = os.environ.get("TESTBED_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "testbed"
    return Path.home() / ".cache" / "testbed" / "run"


def data_root() -> Path:
    """Where `testbed up` keeps NVDIMM backing files: $TESTBED_DATA_DIR or
    $XDG_DATA_HOME/testbed/vms."""
    env = os.environ.get("TESTBED_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "testbed" / "vms"


@dataclass
class GuestState:
    name: str
    pid: int
    ssh_port: int
    accel: str
    state_dir: str
    qmp_socket: str
    console_log: str
    client_key: str
    known_hosts: str
    image: str
    started_at: float
    boot_seconds: float
    nvdimms: list[dict[str, Any]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


class BadName(ValueError):
    """A guest name that is not the identifier it becomes (QEMU -name, a directory name)."""


def check_name(name: str) -> str:
    """`name` unchanged if it is a valid guest name, else BadName. A name becomes QEMU's -name
    and the directory <runtime>/<name>/ (and <data>/<name>/), so it must be one plain path
    component: letters, digits, '_', '.', '-', starting with a letter or digit ('..', '.', '/'
    and absolute paths cannot match)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadName(f"bad guest name {name!r}: expected 1-63 letters, digits, '_', '.' or '-',"
                      f" starting with a letter or digit")
    return name


def state_dir(name: str) -> Path:
    return runtime_root() / check_name(name)


def data_dir(name: str) -> Path:
    """Where guest `name`'s NVDIMM backing files live."""
    return data_root() / check_name(name)


def inside(path: Path, root: Path) -> bool:
    """Does `path` (not following a final symlink) lie strictly inside `root`?"""
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(path.parent)
    candidate = os.path.join(real_parent, path.name)
    return os.path.commonpath([real_root, candidate]) == real_root and candidate != real_root


def remove_state_dir(name: str) -> None:
    """Delete <runtime>/<name>/ and nothing else: the name is checked, the path is proven to lie
    inside the runtime folder, and a symlink there is unlinked, never followed."""
    root = runtime_root()
    path = state_dir(name)
    if not inside(path, root):
        raise BadName(f"refusing to delete {path}: not inside the runtime folder {root}")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def save(state: GuestState) -> None:
    path = Path(state.state_dir) / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # Run state is private (its folder is 0700 too): ports, key paths, the QMP socket's path.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(state), indent=2) + "\n")
    tmp.rename(path)


def load(name: str) -> GuestState | None:
    try:
        return GuestState(**json.loads((state_dir(name) / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def names() -> list[str]:
    """Guests with a state folder: real directories whose name is a valid guest name (`down
    --all` never touches anything else it finds there)."""
    root = runtime_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if NAME_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def qemu_pids(name: str) -> list[int]:
    """QEMU processes serving this guest, found by their QMP socket path on the command line:
    catches stragglers whose state.json is gone or stale, and never a reused pid."""
    marker = str(state_dir(name) / "qmp.sock").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def kill_all(name: str, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace`, every QEMU of this guest. Returns the pids seen."""
    pids = qemu_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end and qemu_pids(name):
            time.sleep(0.05)
        if not qemu_pids(name):
            break
    return pids
