"""The guest agent's commands: prepare, workload, recover-and-dump (stdlib only).

Every command takes one JSON object on stdin (never a shell string built from scenario values)
and prints one JSON object on stdout. See __main__.py for the config schema of each command.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from tbagent import clients
from tbagent.atstep import StepTrap
from tbagent.payload import WriteId, decode_block, make_block, op_at

MIB = 1 << 20
# Test-only faults (the host's test suite sets this in the agent's environment; no scenario key
# or CLI flag reaches it): they make the target or the agent misbehave on purpose so the tests
# can prove that the host turns each misbehaviour into the right verdict or failure.
# `unpersisted-data` and `unpersisted-mapping` are BTT8 persistence defects
# (btt8.core.Pool._inject_test_fault) injected into every pool the workload opens.
TEST_FAULT = os.environ.get("TBAGENT_TEST_FAULT", "")
BTT8_TEST_FAULTS = ("unpersisted-data", "unpersisted-mapping")
TRACEBACK_CHARS = 3000  # an event line stays well inside one write to the port


class ConfigError(ValueError):
    """The host sent a config the agent cannot run: a testbed bug, not a verdict."""


class Target(Protocol):
    nblock: int

    def read(self, lba: int) -> bytes: ...
    def write(self, lba: int, data: bytes) -> None: ...
    def zero(self, lba: int) -> None: ...
    def close(self) -> None: ...


class PoolTarget:
    """A BTT8 pool on a devdax device or a file in a DAX filesystem; open() runs recovery."""

    def __init__(self, path: str, bsize: int, persistence: str = "eadr", seed: int = 0) -> None:
        import btt8  # deployed beside tbagent; imported late so raw targets work without it

        # persistence: the model the pool runs under (btt8.pmem.with_model). Under adr the
        # stores live in a DRAM copy until persisted; a QMP cut kills it with the guest.
        self.pool = btt8.open(path, bsize, persistence=persistence, seed=seed)
        if TEST_FAULT in BTT8_TEST_FAULTS:
            self.pool._inject_test_fault(TEST_FAULT)
        self.nblock = self.pool.nblock

    def read(self, lba: int) -> bytes:
        return self.pool.read(lba)

    def write(self, lba: int, data: bytes) -> None:
        self.pool.write(lba, data)

    def zero(self, lba: int) -> None:
        self.pool.set_zero(lba)

    def close(self) -> None:
        self.pool.close()


class DeviceTarget:
    """A block device (raw /dev/pmemN, kernel BTT /dev/pmemNs) or, in host tests, a file.

    Block devices use O_DIRECT so every op reaches the device (no page cache to lose or to
    serve stale reads); O_DIRECT needs aligned buffers, hence one mmap'd buffer per thread.
    Regular files (tmpfs has no O_DIRECT) use plain pread/pwrite.
    """

    def __init__(self, path: str, bsize: int) -> None:
        self.bsize = bsize
        self.direct = stat.S_ISBLK(os.stat(path).st_mode)
        flags = os.O_RDWR | (os.O_DIRECT if self.direct else 0)
        self.fd = os.open(path, flags)
        self.nblock = os.lseek(self.fd, 0, os.SEEK_END) // bsize
        self.local = threading.local()

    def _buffer(self) -> mmap.mmap:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = mmap.mmap(-1, self.bsize)
        return buf

    def read(self, lba: int) -> bytes:
        buf = self._buffer()
        if os.preadv(self.fd, [buf], lba * self.bsize) != self.bsize:
            raise OSError(f"short read at lba {lba}")
        return bytes(buf)

    def write(self, lba: int, data: bytes) -> None:
        buf = self._buffer()
        buf[:] = data
        if os.pwritev(self.fd, [buf], lba * self.bsize) != self.bsize:
            raise OSError(f"short write at lba {lba}")

    def zero(self, lba: int) -> None:
        self.write(lba, bytes(self.bsize))

    def close(self) -> None:
        os.close(self.fd)


class RaisingTarget:
    """Test fault `worker-raises`: the target raises a ValueError (not an OSError) on thread
    0's 20th write, as BTT8 once did when a lane's cycle outgrew 64 bits."""

    def __init__(self, inner: Target) -> None:
        self.inner, self.nblock, self.writes = inner, inner.nblock, 0

    def read(self, lba: int) -> bytes:
        return self.inner.read(lba)

    def write(self, lba: int, data: bytes) -> None:
        if threading.current_thread().name == "tb-0":
            self.writes += 1
            if self.writes == 20:
                raise ValueError("test fault worker-raises: int too big to convert")
        self.inner.write(lba, data)

    def zero(self, lba: int) -> None:
        self.inner.zero(lba)

    def close(self) -> None:
        self.inner.close()


def scribble_superblock(path: str) -> None:
    """Test fault `corrupt-target`: zero the BTT8 signature under the open pool, so the next
    recovery finds the target corrupt."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 2 * MIB) as m:  # devdax maps in 2 MiB units; pools are >= 16 MiB
            m[:8] = bytes(8)
    finally:
        os.close(fd)


def open_target(target: dict[str, Any], seed: int = 0) -> Target:
    """seed: for a persistence model that draws (adr-evict's early write-backs)."""
    kind, path, bsize = target["kind"], target["path"], target["bsize"]
    if kind == "btt8":
        return PoolTarget(path, bsize, target.get("persistence", "eadr"), seed)
    if kind in ("raw-pmem", "kernel-btt", "btt8-blk"):
        return DeviceTarget(path, bsize)
    raise ConfigError(f"unknown target kind {kind!r}")


def prepare(config: dict[str, Any]) -> dict[str, Any]:
    """Format the target so every LBA of the working set starts as 'zero'."""
    target, lbas = config["target"], config["lbas"]
    if target.get("client", "agent") != "agent":  # fio, ext4: tbagent.clients
        return clients.prepare(config)
    if target["kind"] == "btt8":
        import btt8

        # A device is formatted in place (its whole size when pool_mib is absent).
        btt8.create(_fresh_pool_path(target), target["bsize"],
                    (target.get("pool_mib") or 0) * MIB).close()
    dev = open_target(target)
    try:
        if lbas > dev.nblock:
            raise ConfigError(f"working set of {lbas} blocks exceeds the target's {dev.nblock}")
        if target["kind"] != "btt8":  # a fresh BTT8 pool already reads zero everywhere
            for lba in range(lbas):
                dev.zero(lba)
        return {"ok": True, "nblock": dev.nblock}
    finally:
        dev.close()


def _fresh_pool_path(target: dict[str, Any]) -> str:
    """The pool's path, a pool file of an earlier run removed (create refuses to overwrite)."""
    path = target["path"]
    if target.get("pool_mib") and os.path.isfile(path):
        os.unlink(path)
    return str(path)


def create(config: dict[str, Any]) -> dict[str, Any]:
    """Format the BTT8 target step by step (btt8.steps.create_steps) under the target's
    persistence model, for a cut during create: events start, pause (at_step), done."""
    import btt8
    from btt8.core import Layout
    from btt8.steps import create_steps

    target, epoch, seed = config["target"], config["epoch"], config["seed"]
    if target["kind"] != "btt8" or target.get("client", "agent") != "agent":
        raise ConfigError(f"create cuts need a btt8 target, not {target['kind']!r}")
    log = EventLog(config["events"])
    trap = StepTrap(config["at_step"], log.emit) if config.get("at_step") else None
    log.emit({"ev": "start", "t": time.monotonic_ns(), "epoch": epoch, "pid": os.getpid()})
    size = (target.get("pool_mib") or 0) * MIB
    media = btt8.MappedPmem(_fresh_pool_path(target), create_size=size)
    pmem = btt8.with_model(media, target.get("persistence", "eadr"), seed * 1_000_003 + epoch)
    try:
        steps = create_steps(pmem, Layout.for_pool(target["bsize"], size or pmem.size))
        if trap is None:
            for _ in steps:
                pass
        else:
            trap.drive(steps, {"epoch": epoch, "thread": 0, "op": 0, "kind": "create"})
    finally:
        pmem.close()
    log.emit({"ev": "done", "t": time.monotonic_ns(), "epoch": epoch, "errors": []})
    log.close()
    return {"ok": True}


class EventLog:
    """JSON lines on an unbuffered fd: nothing sits in a user-space buffer at the power cut.

    A write to a virtio-serial port may take less than the line, or nothing at all, when the
    port's queue is full (the driver then returns 0 rather than blocking): every byte is written
    before the next line, under a lock so lines of different threads never interleave. A line
    the host never gets is an op it never saw start, which the oracle cannot judge."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = memoryview(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        with self.lock:
            while line:
                written = os.write(self.fd, line)
                if not written:
                    time.sleep(0.0005)  # the port's queue is full: QEMU is draining it
                line = line[written:]

    def close(self) -> None:
        os.close(self.fd)


def workload(config: dict[str, Any]) -> dict[str, Any]:
    """Run the per-thread deterministic op sequences until exhausted, the deadline, or the cut."""
    if config["target"].get("client", "agent") != "agent":  # fio, ext4: tbagent.clients
        client_log = EventLog(config["events"])
        try:
            return clients.WORKLOADS[config["target"]["client"]](config, client_log)
        finally:
            client_log.close()
    seed, epoch, threads = config["seed"], config["epoch"], config["threads"]
    lbas, mix, bsize = config["lbas"], config["mix"], config["target"]["bsize"]
    ops, duration_s = config.get("ops"), config.get("duration_s")
    if (ops is None) == (duration_s is None):
        raise ConfigError("give exactly one of ops or duration_s")
    resume = config.get("resume") or [0] * threads
    if len(resume) != threads:
        raise ConfigError(f"resume has {len(resume)} offsets for {threads} threads")

    dev = open_target(config["target"], seed * 1_000_003 + epoch)  # a new draw each epoch
    if TEST_FAULT == "worker-raises":
        dev = RaisingTarget(dev)
    elif TEST_FAULT == "corrupt-target":
        scribble_superblock(config["target"]["path"])
    log = EventLog(config["events"])
    trap, pool = None, None  # at_step: ops through btt8.steps, one thread held at a label
    if config.get("at_step"):
        if not isinstance(dev, PoolTarget):
            raise ConfigError("at_step cuts need a btt8 target")
        trap, pool = StepTrap(config["at_step"], log.emit), dev.pool
    deadline = time.monotonic_ns() + int(duration_s * 1e9) if duration_s is not None else None
    errors: list[str] = []

    def run(thread: int) -> None:
        index = resume[thread]
        end = index + ops if ops is not None else None
        while (end is None or index < end) and (deadline is None or time.monotonic_ns() < deadline):
            kind, lba = op_at(seed, thread, index, lbas, mix)
            base = {"epoch": epoch, "thread": thread, "op": index, "kind": kind, "lba": lba}
            data = (
                make_block(seed, lba, WriteId(epoch, thread, index), bsize)
                if kind == "write"
                else b""
            )
            log.emit({"ev": "invoke", "t": time.monotonic_ns(), **base})
            try:
                if trap is None:
                    observed = _apply(dev, kind, lba, data)
                else:
                    observed = trap.apply(pool, kind, lba, data, base)
            except OSError as e:
                # The op's effect is unknown (the host treats it like one cut short); stop the
                # thread: a failing device makes every later op meaningless.
                log.emit({"ev": "fail", "t": time.monotonic_ns(), **base, "error": str(e)})
                errors.append(f"thread {thread} op {index}: {e}")
                return
            except Exception:
                # Anything else the target raises is a bug in it: the host judges the round
                # a `worker-died` violation with this traceback as the evidence.
                tb = traceback.format_exc()[-TRACEBACK_CHARS:]
                log.emit({"ev": "died", "t": time.monotonic_ns(), **base, "error": tb})
                errors.append(f"thread {thread} op {index}: died")
                return
            done = {"ev": "ok", "t": time.monotonic_ns(), **base}
            if observed is not None:
                done["value"] = decode_block(observed, seed, lba).to_json()
            log.emit(done)
            index += 1
        log.emit({"ev": "end", "t": time.monotonic_ns(), "epoch": epoch, "thread": thread,
                  "op": index})

    log.emit(
        {
            "ev": "start",
            "t": time.monotonic_ns(),
            "epoch": epoch,
            "seed": seed,
            "threads": threads,
            "resume": resume,
            "pid": os.getpid(),
        }
    )
    workers = [threading.Thread(target=run, args=(t,), name=f"tb-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    log.emit({"ev": "done", "t": time.monotonic_ns(), "epoch": epoch, "errors": errors})
    log.close()
    dev.close()
    return {"ok": not errors, "errors": errors}


def _apply(dev: Target, kind: str, lba: int, data: bytes) -> bytes | None:
    if kind == "read":
        return dev.read(lba)
    if kind == "write":
        dev.write(lba, data)
    else:
        dev.zero(lba)
    return None


def recover_and_dump(config: dict[str, Any]) -> dict[str, Any]:
    """Open the target (BTT8 recovery runs in open), check it, decode every working-set block.

    Any failure to open or check is reported as {"ok": false, "error": ...}: to the oracle
    that is an `unrecoverable` verdict, not a testbed failure.
    """
    target, seed, lbas = config["target"], config["seed"], config["lbas"]
    if TEST_FAULT == "hang-recovery":
        time.sleep(24 * 3600)
    if target.get("client", "agent") != "agent":  # fio verify, e2fsck + files: tbagent.clients
        try:
            return clients.RECOVERS[target["client"]](config)
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    started = time.monotonic()
    try:
        checked = target["kind"] == "btt8" and btt8_check(target["path"], target["bsize"])
        check_s = time.monotonic() - started
        # Recovery only reads, so it opens the media itself (eadr): a cache model's DRAM copy
        # would hold the same bytes, at the cost of copying the whole device in and, at close,
        # writing it all back (seconds a cut on a 256 MiB devdax under TCG).
        dev = open_target({**target, "persistence": "eadr"})
    except Exception as e:  # whatever recovery raises is the evidence
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "not_a_pool": _not_a_pool(e)}
    try:
        blocks = {str(lba): decode_block(dev.read(lba), seed, lba).to_json() for lba in range(lbas)}
    except Exception as e:  # a pool that opens but cannot be read is unrecoverable
        return {"ok": False, "error": f"reading after recovery: {type(e).__name__}: {e}"}
    finally:
        dev.close()
    return {"ok": True, "checked": checked, "check_s": round(check_s, 4), "nblock": dev.nblock,
            "blocks": blocks}


def _not_a_pool(e: Exception) -> bool:
    """Open found no pool at all (no signature, no pool-sized file): what a create cut short
    may leave, as opposed to a pool that is there but inconsistent."""
    import btt8

    if isinstance(e, btt8.CorruptionError):
        return "bad signature" in str(e)
    return isinstance(e, btt8.Btt8Error)


def btt8_check(path: str, bsize: int) -> bool:
    """`btt8 check`: raises on an inconsistent pool (a PBA mapped twice, a wrong number of free
    blocks, a bad superblock) without writing to it."""
    import btt8

    return bool(btt8.check(path, bsize)["ok"])


# The agent's commands (python3 -m tbagent NAME, or a request to tbagent serve).
COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prepare": prepare, "workload": workload, "create": create,
    "recover-and-dump": recover_and_dump}
