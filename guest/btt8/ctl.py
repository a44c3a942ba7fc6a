"""`btt8ctl`: a BTT8 pool as a kernel block device, the shape of the seed's block driver.

    btt8ctl format DEV --bsize N [--pool-mib M] [--force]
    btt8ctl attach DEV [--name btt8a] [--connections 2] [--threads 16]  -> /dev/btt8a
    btt8ctl detach NAME                 # flush, disconnect, stop the server; pool intact
    btt8ctl list [--json]

DEV is a devdax device (/dev/daxN.M) or a pool file on an fsdax filesystem. `attach` serves the
pool with nbdkit's Python plugin (btt8/nbdkit_plugin.py, whose verbs call the BTT8 core) on a
unix socket, connects the kernel NBD client to it with the BTT8 block size as the logical and
physical block size, and names the device: /dev/NAME is a symlink to its /dev/nbdN (the guest
has no udev). State of attached devices: /run/btt8ctl/NAME.json (gone with the power, like the
kernel's own state), the server's log beside it.

`attach` first runs BTT8's read-only check; an unformatted or corrupt device (or a block size
other than the pool's) fails with one error line, exit 1, before anything writes to it.

Exit status: 0 done; 1 the device is not an attachable BTT8 pool; 2 anything else (usage, a
name in use, nbdkit or nbd-client failing). Runs as root in the guest: `python3 -m btt8.ctl`
(the image's /usr/local/sbin/btt8ctl wraps it). stdlib only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import core

STATE_DIR = Path(os.environ.get("BTT8CTL_STATE_DIR", "/run/btt8ctl"))
PLUGIN = Path(__file__).resolve().parent / "nbdkit_plugin.py"
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # PYTHONPATH that finds btt8
NBD_BLOCK_SIZES = (512, 1024, 2048, 4096)  # what the kernel NBD client accepts
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
EXIT_OK, EXIT_NOT_ATTACHABLE, EXIT_ERROR = 0, 1, 2


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- format ---


def format_pool(dev: str, bsize: int, pool_mib: int = 0, force: bool = False) -> dict[str, Any]:
    """Make DEV a fresh BTT8 pool (every block reads as zeros). Refuses an attached pool, and
    an existing pool or pool file unless `force`."""
    if bsize not in NBD_BLOCK_SIZES:
        raise CtlError(f"--bsize must be one of {', '.join(map(str, NBD_BLOCK_SIZES))} "
                       f"(the kernel NBD client's block sizes), got {bsize}")
    for st in attached():
        if os.path.realpath(st["pool"]) == os.path.realpath(dev):
            raise CtlError(f"{dev} is attached as /dev/{st['name']} (btt8ctl detach first)")
    try:
        mode = os.stat(dev).st_mode
    except FileNotFoundError:
        mode = None
    is_device = mode is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode))
    if mode is not None and not force:
        if not is_device:
            raise CtlError(f"{dev} exists (--force replaces it)")
        try:
            core.check(dev)
        except OSError:
            pass  # no (valid) pool there: formatting loses nothing of ours
        else:
            raise CtlError(f"{dev} already holds a BTT8 pool (--force reformats it)")
    if mode is not None and not is_device:
        os.unlink(dev)
    if not is_device and not pool_mib:
        raise CtlError("a pool file needs --pool-mib")
    try:
        with core.create(dev, bsize, pool_mib << 20) as pool:
            return {"pool": dev, "bsize": pool.bsize, "nblock": pool.nblock}
    except OSError as e:
        raise CtlError(f"cannot format {dev}: {e}") from e


# --- attach / detach / list ---


def _state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _alive(pid: int) -> bool:
    try:
        return b"nbdkit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def attached() -> list[dict[str, Any]]:
    """Every attached device's state (plus `server_alive`), by name."""
    out = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        st["server_alive"] = _alive(int(st.get("pid", 0)))
        out.append(st)
    return out


def _run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise CtlError(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise CtlError(f"{argv[0]} did not finish within {timeout:g} s") from e


def _free_nbd() -> str:
    if not Path("/sys/module/nbd").exists():
        r = _run(["modprobe", "nbd"])
        if r.returncode:
            raise CtlError(f"modprobe nbd failed: {r.stderr.strip()}")
    taken = {st["nbd"] for st in attached()}
    for i in range(int(Path("/sys/module/nbd/parameters/nbds_max").read_text())):
        dev, sysfs = f"/dev/nbd{i}", Path(f"/sys/block/nbd{i}")
        if dev in taken or not sysfs.exists() or (sysfs / "pid").exists():
            continue
        if int((sysfs / "size").read_text()) == 0:
            return dev
    raise CtlError("no free /dev/nbdN")


def attach(dev: str, name: str = "btt8a", connections: int = 2,
           threads: int = 16) -> dict[str, Any]:
    if not NAME_RE.match(name):
        raise CtlError(f"bad name {name!r} (lowercase letters, digits, - and _)")
    link = Path("/dev") / name
    if _state_path(name).exists() or os.path.lexists(link):
        raise CtlError(f"/dev/{name} already exists (btt8ctl list; btt8ctl detach {name})")
    if not os.path.exists(dev):
        raise CtlError(f"{dev} does not exist", EXIT_NOT_ATTACHABLE)
    try:  # read-only: a device that fails here has not been written to
        info = core.check(dev)
    except core.CorruptionError as e:
        raise CtlError(f"cannot attach {dev}: not a consistent BTT8 pool: {e.strerror or e}; "
                       f"nothing was written to it", EXIT_NOT_ATTACHABLE) from e
    except OSError as e:
        code = EXIT_ERROR if e.errno == errno.EBUSY else EXIT_NOT_ATTACHABLE
        raise CtlError(f"cannot attach {dev}: {e.strerror or e}; nothing was written to it",
                       code) from e
    bsize = int(info["bsize"])  # type: ignore[call-overload]
    if bsize not in NBD_BLOCK_SIZES:
        raise CtlError(f"cannot attach {dev}: block size {bsize} is not one the kernel NBD "
                       f"client takes ({', '.join(map(str, NBD_BLOCK_SIZES))})",
                       EXIT_NOT_ATTACHABLE)
    nbd = _free_nbd()
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock, pidfile, logfile = (STATE_DIR / f"{name}.{ext}" for ext in ("sock", "pid", "log"))
    for p in (sock, pidfile):
        p.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    with open(logfile, "ab") as log:
        # nbdkit opens the pool (BTT8 recovery) before it forks into the background, so this
        # returns once the pool is open and the socket listens, or with the open's error.
        r = subprocess.run(
            ["nbdkit", "--unix", str(sock), "--pidfile", str(pidfile), "--threads", str(threads),
             "--log=stderr", "python", str(PLUGIN), f"pool={dev}", f"bsize={bsize}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, timeout=600)
    if r.returncode:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
        raise CtlError(f"nbdkit could not serve {dev}: {' | '.join(tail)}")
    pid = _wait_pidfile(pidfile)
    state = {"name": name, "device": str(link), "nbd": nbd, "pool": dev, "bsize": bsize,
             "nblock": info["nblocks"], "size": bsize * int(info["nblocks"]),  # type: ignore[call-overload]
             "socket": str(sock), "pid": pid, "connections": connections, "threads": threads,
             "log": str(logfile), "persist_mode": info.get("persist_mode")}
    _state_path(name).write_text(json.dumps(state, indent=1) + "\n")
    try:
        c = _run(["nbd-client", "-u", str(sock), nbd, "-b", str(bsize), "-C", str(connections),
                  "-N", name])
        if c.returncode:
            raise CtlError(f"nbd-client could not connect {nbd}: {c.stderr.strip()}")
        _wait_size(nbd, state["size"])
        os.symlink(os.path.basename(nbd), link)
    except BaseException:
        _stop_server(state)
        _state_path(name).unlink(missing_ok=True)
        raise
    return state


def _wait_pidfile(pidfile: Path, timeout: float = 30) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return int(pidfile.read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise CtlError(f"nbdkit wrote no pid file ({pidfile}) within {timeout:g} s")


def _wait_size(nbd: str, size: int, timeout: float = 30) -> None:
    sysfs = Path("/sys/block") / os.path.basename(nbd) / "size"
    end = time.monotonic() + timeout
    while int(sysfs.read_text()) * 512 != size:
        if time.monotonic() > end:
            raise CtlError(f"{nbd} did not get its size ({size} bytes) within {timeout:g} s")
        time.sleep(0.02)


def _mounted(paths: set[str]) -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split(" ", 1)[0] in paths:
            return True
    return False


def detach(name: str) -> dict[str, Any]:
    try:
        state = json.loads(_state_path(name).read_text())
    except FileNotFoundError:
        raise CtlError(f"{name} is not attached (btt8ctl list)") from None
    nbd, link = state["nbd"], state["device"]
    if _mounted({nbd, link, os.path.realpath(link)}):
        raise CtlError(f"{link} is mounted (umount it first)")
    if Path("/sys/block", os.path.basename(nbd), "pid").exists():
        fd = os.open(nbd, os.O_RDONLY)
        try:
            os.fsync(fd)  # the block device's dirty buffers, then an NBD flush
        finally:
            os.close(fd)
        r = _run(["nbd-client", "-d", nbd])
        if r.returncode:
            raise CtlError(f"nbd-client -d {nbd} failed: {r.stderr.strip()}")
    _stop_server(state)
    if os.path.islink(link):
        os.unlink(link)
    _state_path(name).unlink(missing_ok=True)
    return state


def _stop_server(state: dict[str, Any], timeout: float = 60) -> None:
    """SIGTERM nbdkit (it finishes its requests and closes the pool), SIGKILL if it hangs."""
    pid = int(state["pid"])
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            break
        os.kill(pid, sig)
        end = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
    Path(state["socket"]).unlink(missing_ok=True)
    Path(state["socket"]).with_suffix(".pid").unlink(missing_ok=True)


# --- the command line ---


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btt8ctl", description="BTT8 pools as block devices")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("format", help="make DEV (devdax device or pool file) a BTT8 pool")
    f.add_argument("dev")
    f.add_argument("--bsize", type=int, required=True, help="512, 1024, 2048 or 4096")
    f.add_argument("--pool-mib", type=int, default=0, help="size of a new pool file")
    f.add_argument("--force", action="store_true", help="reformat an existing pool")
    a = sub.add_parser("attach", help="serve DEV as /dev/NAME")
    a.add_argument("dev")
    a.add_argument("--name", default="btt8a")
    a.add_argument("--connections", type=int, default=2, help="NBD connections (multi-conn)")
    a.add_argument("--threads", type=int, default=16, help="nbdkit threads per connection")
    d = sub.add_parser("detach", help="flush and disconnect /dev/NAME; the pool stays intact")
    d.add_argument("name")
    ls = sub.add_parser("list", help="attached devices")
    ls.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "format":
            r = format_pool(args.dev, args.bsize, args.pool_mib, args.force)
            print(f"formatted {r['pool']}: bsize {r['bsize']}, {r['nblock']} blocks")
        elif args.command == "attach":
            st = attach(args.dev, args.name, args.connections, args.threads)
            print(f"attached {st['pool']} as {st['device']} -> {st['nbd']} "
                  f"(bsize {st['bsize']}, {st['nblock']} blocks)")
        elif args.command == "detach":
            st = detach(args.name)
            print(f"detached {st['device']} ({st['pool']})")
        else:
            rows = attached()
            if args.json:
                print(json.dumps(rows, indent=1))
            for st in [] if args.json else rows:
                print(f"{st['name']:<8} {st['nbd']:<11} {st['pool']}  bsize {st['bsize']}  "
                      f"{st['nblock']} blocks  server {'up' if st['server_alive'] else 'DOWN'}")
    except CtlError as e:
        print(f"btt8ctl: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"btt8ctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
