"""Unmodified clients on a block-device target: fio with verification, ext4 under a
metadata-heavy load (stdlib only; fio, mkfs.ext4, e2fsck and mount are the guest's own).

The agent's commands dispatch here when the target has `"client": "fio" | "ext4"` (the
default, `agent`, is the agent's own register workload in agent.py):

prepare           fio: nothing to write (fio's verify header carries offset and seed);
                  ext4: mkfs.ext4 once.  -> {"ok": true, "nblock": n}
workload          events: start; fio: `fio-state` (its saved verify state, base64, emitted by
                  the trigger that fires before the cut, or when fio ends; with its job's
                  seed, epoch, threads, lbas) and done;
                  ext4: per op invoke then ok | fail | died, end, done (as the agent's).
recover-and-dump  fio: `fio --verify_only --verify_state_load` with the state the host sends
                  back ({"fio_state": {file: base64}, "fio_job": {...}, "fio_complete": bool})
                  -> {"ok", "blocks": {}, "verify": {...}}
                  ext4: mount (journal replay) + umount, `e2fsck -fn`, repair with -fy only
                  when that found errors (so later rounds run on a consistent filesystem),
                  mount, sha256 of every load file -> {"ok", "blocks": {}, "mount_error",
                  "fsck": {"rc", "output"}, "repair", "files": {path: sha256}}

ext4 ops (thread t works in t<t>/, op i's choices seeded by (seed, t, i)):
  write   data to .tmp.<i>, fsync, rename over e<epoch>.<i> (new) or over an existing file,
          fsync the directory: once `ok`, the file under that name must hold that content
  unlink  an existing file, fsync the directory
  noise   an un-fsync'd scratch file (metadata churn; never judged)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import threading
import time
import traceback
from typing import Any

FIO_DIR = "/run/tbagent-fio"  # verify state files and the trigger file (the host touches it)
FIO_TRIGGER = f"{FIO_DIR}/trigger"
# fio runs its trigger command through system(): a fixed string, no scenario value in it. It
# only marks that the state files are written: the agent, which holds the event port (a
# virtio-serial port has one opener at a time), sends them.
FIO_FIRED = f"{FIO_DIR}/fired"
FIO_TRIGGER_CMD = f"touch {FIO_FIRED}"
FIO_JOB = "tb"
EXT4_MOUNT = "/mnt/tb-ext4"
EXT4_MAX_FILE = 48 * 1024
TAIL = 2000


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def prepare(config: dict[str, Any]) -> dict[str, Any]:
    target = config["target"]
    path, bsize, client = target["path"], target["bsize"], target["client"]
    nblock = _size(path) // bsize
    if config["lbas"] > nblock:
        return {"ok": False, "error": f"working set of {config['lbas']} blocks exceeds the "
                                      f"target's {nblock}"}
    if client == "ext4":
        _umount_quietly()
        r = _run(["mkfs.ext4", "-q", "-F", "-b", "4096",
                  "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", path])
        if r.returncode:
            return {"ok": False, "error": f"mkfs.ext4: {r.stderr[-TAIL:]}"}
    return {"ok": True, "nblock": nblock}


# --- fio ---


def fio_job(config: dict[str, Any], verify: bool) -> list[str]:
    """The write job and, with `verify`, the same job replayed as a read-verify: same region,
    block size, job count and random seed (so the same offsets and verify headers)."""
    target, threads = config["target"], config["threads"]
    bsize = target["bsize"]
    per_job = config["lbas"] // threads * bsize
    seed = random.Random(f"{config['seed']}:fio:{config['epoch']}").getrandbits(48)
    # Queue depth 1 per job (concurrency comes from the `threads` jobs): fio 3.33's saved state
    # holds the number of writes issued and the last `depth` completions, and its verify
    # assumes every write older than the last `depth` issued had completed. Through NBD (two
    # connections, nbdkit threads) writes complete out of order, so at a deeper queue an older
    # write still in flight at the trigger would be verified and read back as a false bad
    # block. At depth 1 the one write that can be in flight is the last issued. (Later fio
    # versions record the in-flight writes themselves.)
    argv = ["fio", f"--name={FIO_JOB}", f"--filename={target['path']}", "--direct=1",
            "--ioengine=psync", "--iodepth=1", "--rw=randwrite", f"--bs={bsize}",
            f"--size={per_job}", f"--offset_increment={per_job}", f"--numjobs={threads}",
            f"--randseed={seed}", "--verify=crc32c", "--output-format=json"]
    if verify:
        return argv + ["--verify_only", "--do_verify=1", "--verify_fatal=0"]
    return argv + ["--do_verify=0", "--verify_state_save=1",
                   f"--runtime={config.get('duration_s') or 600}",
                   f"--trigger-file={FIO_TRIGGER}", f"--trigger={FIO_TRIGGER_CMD}"]


JOB_KEYS = ("seed", "epoch", "threads", "lbas")  # what fio_job needs besides the target


def emit_fio_state(log: Any, config: dict[str, Any], complete: bool) -> None:
    """The saved verify state and the job it belongs to: the host sends both back for the
    verify after the cut (the guest's root disk does not survive a cold restart)."""
    files = {}
    for name in sorted(os.listdir(FIO_DIR)):
        if name.endswith(".state"):
            with open(os.path.join(FIO_DIR, name), "rb") as f:
                files[name] = base64.b64encode(f.read()).decode()
    log.emit({"ev": "fio-state", "t": time.monotonic_ns(), "epoch": config["epoch"],
              "files": files, "complete": complete,
              "job": {k: config[k] for k in JOB_KEYS}})


def fio_workload(config: dict[str, Any], log: Any) -> dict[str, Any]:
    """fio writes the round's region once (random order, crc32c verify headers) until the host
    touches the trigger file: fio saves its verify state, stops its jobs and runs the trigger
    command, which sends the state to the host; the host then cuts."""
    os.makedirs(FIO_DIR, exist_ok=True)
    for name in os.listdir(FIO_DIR):
        os.unlink(os.path.join(FIO_DIR, name))
    epoch = config["epoch"]
    log.emit({"ev": "start", "t": time.monotonic_ns(), "epoch": epoch, "seed": config["seed"],
              "threads": config["threads"], "client": "fio", "pid": os.getpid()})
    fio = subprocess.Popen(fio_job(config, verify=False), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=FIO_DIR)
    outputs: list[bytes] = []
    reader = threading.Thread(target=lambda: outputs.extend(fio.communicate()), daemon=True)
    reader.start()
    sent = False
    while fio.poll() is None:
        if not sent and os.path.exists(FIO_FIRED):
            emit_fio_state(log, config, complete=False)  # the host cuts once it has this
            sent = True
        time.sleep(0.005)
    reader.join()
    if not sent:  # fio ended (runtime, or the region written) before the trigger
        emit_fio_state(log, config, complete=True)
    ok = fio.returncode == 0
    stderr = (outputs[1] if len(outputs) > 1 else b"").decode(errors="replace")[-TAIL:]
    errors = [] if ok else [f"fio rc {fio.returncode}: {stderr}"]
    log.emit({"ev": "done", "t": time.monotonic_ns(), "epoch": epoch, "errors": errors})
    return {"ok": ok, "errors": errors}


def fio_verify(config: dict[str, Any]) -> dict[str, Any]:
    os.makedirs(FIO_DIR, exist_ok=True)
    for name in os.listdir(FIO_DIR):
        os.unlink(os.path.join(FIO_DIR, name))
    state = config.get("fio_state") or {}
    for name, data in state.items():
        if "/" in name or not name.endswith(".state"):
            raise ValueError(f"bad state file name {name!r}")
        with open(os.path.join(FIO_DIR, name), "wb") as f:
            f.write(base64.b64decode(data))
    job = {**config, **config["fio_job"]}
    # A run cut short verifies up to its saved state; one that wrote its whole region before
    # the trigger verifies all of it (fio's end-of-job state is not a write-phase state).
    partial = state and not config.get("fio_complete")
    argv = fio_job(job, verify=True) + (["--verify_state_load=1"] if partial else [])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=FIO_DIR, timeout=1800)
    verified, error = 0, None
    try:
        for job in json.loads(r.stdout[r.stdout.index("{"):])["jobs"]:
            verified += int(job["read"]["total_ios"])
            error = error or int(job.get("error", 0)) or None
    except (ValueError, KeyError, TypeError):
        error = error or -1
    bad = [line for line in r.stderr.splitlines()
           if "verify" in line and ("bad" in line or "fail" in line)]
    return {"ok": True, "blocks": {}, "verify": {
        "rc": r.returncode, "error": error, "verified_ios": verified, "bad": len(bad),
        "state_files": sorted(state), "output": (r.stderr[-TAIL:] or r.stdout[-TAIL:])}}


# --- ext4 ---


def _mounted(mnt: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mnt for line in f)


def _umount_quietly() -> None:
    if _mounted(EXT4_MOUNT):
        _run(["umount", EXT4_MOUNT])


def _mount(path: str) -> str | None:
    """Mount (replaying the journal); the error text, None when mounted."""
    os.makedirs(EXT4_MOUNT, exist_ok=True)
    if _mounted(EXT4_MOUNT):
        return None
    r = _run(["mount", "-t", "ext4", path, EXT4_MOUNT])
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount rc {r.returncode}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_files(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("e"))


def ext4_workload(config: dict[str, Any], log: Any) -> dict[str, Any]:
    seed, epoch, threads = config["seed"], config["epoch"], config["threads"]
    path, duration_s, ops = config["target"]["path"], config.get("duration_s"), config.get("ops")
    resume = config.get("resume") or [0] * threads
    error = _mount(path)
    if error:
        raise OSError(f"mount {path}: {error}")
    dirs = [os.path.join(EXT4_MOUNT, f"t{t}") for t in range(threads)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    _fsync_dir(EXT4_MOUNT)
    deadline = time.monotonic_ns() + int(duration_s * 1e9) if duration_s is not None else None
    errors: list[str] = []

    def run(thread: int) -> None:
        d, index = dirs[thread], resume[thread]
        end = index + ops if ops is not None else None
        while (end is None or index < end) and (deadline is None or time.monotonic_ns() < deadline):
            rng = random.Random(f"{seed}:ext4:{thread}:{index}")
            existing = _load_files(d)
            roll = rng.random()
            base = {"epoch": epoch, "thread": thread, "op": index, "lba": None}
            op = {**base, "kind": "write"}
            try:
                if roll < 0.15 and existing:
                    name = rng.choice(existing)
                    op = {**base, "kind": "unlink", "path": f"t{thread}/{name}"}
                    log.emit({"ev": "invoke", "t": time.monotonic_ns(), **op})
                    os.unlink(os.path.join(d, name))
                    _fsync_dir(d)
                elif roll < 0.25:
                    with open(os.path.join(d, f"n.{index % 8}"), "wb") as f:  # noise
                        f.write(rng.randbytes(rng.randrange(8192)))
                    index += 1
                    continue
                else:
                    name = (rng.choice(existing) if roll < 0.40 and existing
                            else f"e{epoch}.{index}")
                    data = rng.randbytes(rng.randrange(EXT4_MAX_FILE))
                    op = {**base, "kind": "write", "path": f"t{thread}/{name}",
                          "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                    log.emit({"ev": "invoke", "t": time.monotonic_ns(), **op})
                    tmp = os.path.join(d, f".tmp.{index}")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.rename(tmp, os.path.join(d, name))
                    _fsync_dir(d)
            except OSError as e:
                log.emit({"ev": "fail", "t": time.monotonic_ns(), **op, "error": str(e)})
                errors.append(f"thread {thread} op {index}: {e}")
                return
            except Exception:
                tb = traceback.format_exc()[-3000:]
                log.emit({"ev": "died", "t": time.monotonic_ns(), **base, "kind": "write",
                          "error": tb})
                errors.append(f"thread {thread} op {index}: died")
                return
            log.emit({"ev": "ok", "t": time.monotonic_ns(), **op})
            index += 1
        log.emit({"ev": "end", "t": time.monotonic_ns(), "epoch": epoch, "thread": thread,
                  "op": index})

    log.emit({"ev": "start", "t": time.monotonic_ns(), "epoch": epoch, "seed": seed,
              "threads": threads, "resume": resume, "client": "ext4", "pid": os.getpid()})
    workers = [threading.Thread(target=run, args=(t,), name=f"tb-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    log.emit({"ev": "done", "t": time.monotonic_ns(), "epoch": epoch, "errors": errors})
    return {"ok": not errors, "errors": errors}


def ext4_check(config: dict[str, Any]) -> dict[str, Any]:
    path = config["target"]["path"]
    out: dict[str, Any] = {"ok": True, "blocks": {}, "mount_error": None, "repair": None,
                           "files": {}}
    _umount_quietly()
    out["mount_error"] = _mount(path)  # the kernel replays the journal, as at any boot
    if out["mount_error"] is None:
        _run(["umount", EXT4_MOUNT])
    r = _run(["e2fsck", "-fn", path])
    out["fsck"] = {"rc": r.returncode, "output": (r.stdout + r.stderr)[-TAIL:]}
    if r.returncode:
        fix = _run(["e2fsck", "-fy", path])
        out["repair"] = {"rc": fix.returncode, "output": (fix.stdout + fix.stderr)[-TAIL:]}
    error = _mount(path)
    if error:
        out["mount_error"] = out["mount_error"] or error
        return out
    try:
        for top in sorted(os.listdir(EXT4_MOUNT)):
            d = os.path.join(EXT4_MOUNT, top)
            if not (top.startswith("t") and os.path.isdir(d)):
                continue
            for name in _load_files(d):
                with open(os.path.join(d, name), "rb") as f:
                    out["files"][f"{top}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    finally:
        _run(["umount", EXT4_MOUNT])
    return out


WORKLOADS = {"fio": fio_workload, "ext4": ext4_workload}
RECOVERS = {"fio": fio_verify, "ext4": ext4_check}
