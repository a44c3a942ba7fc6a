"""A campaign's temp folder (/tmp/testbed-run-<run id>-XXXX), and the removal of those whose
orchestrator died without removing them (SIGKILL, power loss).

A folder is removed only when it is provably a testbed run folder whose owner is dead:
- its name starts with PREFIX, it is a real directory (not a symlink) owned by this user;
- it holds OWNER, a regular file (opened without following symlinks) that names this folder;
- nobody holds OWNER's lock: the orchestrator takes an exclusive flock on it for as long as it
  runs, and the kernel releases a lock only when its holder exits, however it exits. A live
  run's folder (another campaign running now) is therefore never touched, and a folder of a
  process that reused a dead orchestrator's pid is no obstacle.
The owner file appears already locked (written under a temp name, locked, then renamed), so a
folder that is being created is never judged abandoned. Removal does not follow symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

PREFIX = "testbed-run-"
OWNER = "owner.json"
MAGIC = "testbed campaign temp folder"


class WorkDir:
    """A campaign's temp folder, owned (locked) by this process until `remove`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def create(run_name: str, root: Path | None = None) -> WorkDir:
    """A new temp folder named after the run (short: QEMU's unix sockets live below it, and a
    socket path has 107 bytes at most), locked by this process."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{run_name[:32]}-", dir=root))
    pending = path / f".{OWNER}.new"
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"magic": MAGIC, "dir": str(path), "pid": os.getpid(),
                                 "run": run_name}).encode())
        os.rename(pending, path / OWNER)
    except BaseException:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise
    return WorkDir(path, fd)


def remove_abandoned(root: Path | None = None) -> list[Path]:
    """Remove the temp folders in `root` (default: the temp folder) that are provably a dead
    campaign's (see the module doc); the paths removed. Anything else is left as it is."""
    base = Path(root or tempfile.gettempdir())
    removed = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    for name in names:
        if name.startswith(PREFIX) and _remove_if_abandoned(base / name):
            removed.append(base / name)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone, a symlink (ELOOP/ENOTDIR), not a directory, not ours to open
        return False
    try:
        st = os.fstat(dir_fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        try:
            fd = os.open(OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:  # no owner file (not ours, or an older testbed's): leave it
            return False
        try:
            owner = os.fstat(fd)
            if not stat.S_ISREG(owner.st_mode) or owner.st_uid != os.getuid():
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False  # its campaign is running
                raise
            try:
                facts = json.loads(os.read(fd, 4096))
            except ValueError:
                return False
            if not (isinstance(facts, dict) and facts.get("magic") == MAGIC
                    and facts.get("dir") == str(path)):
                return False
            # Still locked by us: a concurrent cleanup skips it. rmtree opens every level with
            # O_NOFOLLOW and unlinks symlinks, never what they point to.
            shutil.rmtree(path, ignore_errors=True)
            return True
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(dir_fd)
