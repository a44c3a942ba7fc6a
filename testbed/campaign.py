"""`testbed run SCENARIO`: the power-cut campaign.

Data flows one way: scenario -> VM -> guest agent -> cut -> recovery -> verdict -> results.
One QEMU process serves each boot k = 0..N. Boot k recovers and judges cut k (k >= 1), then, if
cuts remain, runs workload round k+1 and is cut. With cut mode `reset` the same process reboots
in place (QMP system_reset) instead of a new process starting on the same backing file.

Acks stream from the guest agent through a virtio-serial port whose host side is a plain file:
a blocking write to the port returns only after QEMU took the bytes, so an event the guest got
past is on the host before the cut (hence `unseen_ops=0` for the oracle).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import image as image_mod
from testbed import oracle
from testbed.guest import plain_ssh_argv
from testbed.nvdimm import (
    MiB,
    NvdimmSpec,
    copy_crash_image,
    device_path,
    init_labels,
    namespaces,
)
from testbed.results import RunResults, progress_line, write_json_atomic
from testbed.scenario import Scenario, load_scenario
from testbed.vm import VM, CommandFailed, SerialPort, VMConfig, VMError

GUEST_ROOT = "/opt/testbed"  # deployed guest packages (btt8, tbagent); PYTHONPATH there
GUEST_PACKAGES = Path(__file__).resolve().parent.parent / "guest"
EVENTS_PORT = "tb.events"
FSDAX_MOUNT = "/mnt/pmem"
# fsdax namespace for a BTT8 pool *file*: ext4 mounted with -o dax (no page cache in the way).
NAMESPACE_MODE = {("btt8", "devdax"): "devdax", ("btt8", "fsdax"): "fsdax",
                  ("kernel-btt", None): "sector", ("raw-pmem", None): "fsdax"}


class CampaignError(Exception):
    """The testbed itself failed (not a verdict on the target): exit 2, never a pass."""


@dataclass
class _Boot:
    """One running guest and the files its QEMU process writes."""

    vm: VM
    events: Path
    events_read: int = 0  # bytes of `events` already consumed by the trigger


@dataclass
class Campaign:
    scenario: Scenario
    scenario_path: Path
    results_root: Path
    say: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    # Test-only: environment for guest agent runs (e.g. BTT8_TEST_FAULT to break BTT8 on
    # purpose). Not reachable from the CLI or a scenario file.
    guest_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.scenario
        self.resume = [0] * s.workload.threads  # next op index per thread, across rounds
        self.started = time.monotonic()
        self.violations = 0
        self.work = Path(tempfile.mkdtemp(prefix="testbed-run-"))
        self.nvdimm = NvdimmSpec(self.work / "nvdimm0.img", s.vm.nvdimm.size_mib * MiB,
                                 s.vm.nvdimm.label_kib * 1024)
        self.staged, self.guest_hash = _stage_guest_packages(self.work / "guest")
        self.device: str | None = None
        self.command_lines: list[list[str]] = []

    # --- the run ---

    def run(self) -> int:
        s = self.scenario
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True, check=False).stdout.splitlines()[:1]
        results = RunResults.create(self.results_root, s, self.scenario_path, {
            "qemu_version": qemu[0] if qemu else "unknown",
            "guest_package_sha256": self.guest_hash,
        })
        self.results = results
        self.say(f"run {results.run_dir}")
        boot: _Boot | None = None
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            t = time.monotonic()
            img = image_mod.build(log=self.say)
            results.record_phase("image", time.monotonic() - t)
            self.image = img
            boot = self._boot(0, results)
            self._setup(boot, results)
            initial: dict[int, oracle.Decoded] | None = None
            for cut in range(1, s.cuts.count + 1):
                boot, initial = self._cut_round(cut, boot, initial)
            self._shutdown(boot)
            boot = None
        except KeyboardInterrupt:
            results.record_failure("interrupted")
        except (CampaignError, VMError, image_mod.ImageError) as e:
            results.record_failure(str(e))
            self.say(f"testbed: {e}")
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._update_manifest()  # every boot's QEMU command line
            if boot is not None:
                boot.vm.cleanup()  # never leave a QEMU behind, whatever happened
            shutil.rmtree(self.work, ignore_errors=True)
        code = results.finish()
        summary = results.summary()
        self.say(f"{summary['status']}: {summary['cuts']}/{s.cuts.count} cuts done, "
                 f"{summary['cuts_with_violations']} with violations"
                 f"{' ' + json.dumps(summary['violations']) if summary['violations'] else ''}, "
                 f"{summary['cuts_per_min']} cuts/min -> {results.run_dir / 'report.html'}")
        return code

    def _progress(self, cut: int, phase: str) -> None:
        self.say(progress_line(cut, self.scenario.cuts.count, phase,
                               time.monotonic() - self.started, self.violations))

    def _cut_round(self, cut: int, boot: _Boot, initial: dict[int, oracle.Decoded] | None
                   ) -> tuple[_Boot, dict[int, oracle.Decoded]]:
        """Workload round `cut` on `boot`, the cut, the recovery boot, the verdict."""
        s, results = self.scenario, self.results
        cut_dir = results.cut_dir(cut)
        phases: dict[str, float] = {}
        self._progress(cut, "workload")
        config = s.workload_config(self._target_path(), f"/dev/virtio-ports/{EVENTS_PORT}",
                                   cut, self.resume)
        t = time.monotonic()
        runner = _AgentRun(boot.vm, self._agent_argv("workload"), config,
                           s.timeouts.workload_s + 30)
        cut_at_s = self._wait_trigger(boot, cut, runner)
        phases["workload"] = time.monotonic() - t

        self._progress(cut, "cut")
        t = time.monotonic()
        crash_image = self.work / "crash.img"
        if s.cuts.mode == "reset":
            # Freeze the guest at the cut instant so the media can be copied, then reset it.
            boot.vm.qmp("stop")
            copy_crash_image(self.nvdimm.backing, crash_image)
            boot.vm.crash("reset")
            boot.vm.qmp("cont")
        else:
            boot.vm.crash("quit")
            copy_crash_image(self.nvdimm.backing, crash_image)
        runner.join(10)
        _save_events(boot.events, cut, cut_dir / "events.jsonl")
        self._save_logs(boot, cut_dir, "")
        phases["cut"] = time.monotonic() - t

        self._progress(cut, "boot")
        t = time.monotonic()
        if s.cuts.mode == "reset":
            boot.vm.wait_for_ssh(s.timeouts.boot_s)
        else:
            boot = self._boot(cut, results)
        phases["boot"] = time.monotonic() - t

        self._progress(cut, "recover")
        t = time.monotonic()
        self._attach(boot)
        recovery = self._recover(boot)
        write_json_atomic(cut_dir / "recovery.json", recovery)
        phases["recover"] = time.monotonic() - t

        self._progress(cut, "judge")
        t = time.monotonic()
        events = oracle.read_events(cut_dir / "events.jsonl")
        verdict = oracle.judge(config, events, recovery, initial, unseen_ops=0)
        self.resume = oracle.next_resume(events, config["resume"])
        phases["judge"] = time.monotonic() - t
        results.record_cut(cut, verdict.to_json(), phases, crash_image=crash_image,
                           cut_at_s=cut_at_s)
        crash_image.unlink()
        counts = verdict.counts()
        self.violations += sum(counts.values())
        self.say(f"cut {cut}: {'ok' if verdict.ok else 'VIOLATIONS ' + json.dumps(counts)}"
                 f" (cut {cut_at_s:.2f} s into the workload)")
        return boot, oracle.initial_state(recovery)

    # --- phases ---

    def _boot(self, k: int, results: RunResults) -> _Boot:
        """Start QEMU on the campaign's NVDIMM backing file; ssh-ready within boot_s."""
        s, img = self.scenario, self.image
        state_dir = Path(tempfile.mkdtemp(prefix=f"boot{k}-", dir=self.work))
        events = state_dir / "events.jsonl"
        config = VMConfig(
            name=f"tb-{s.name}-{k}"[:63], kernel=img.kernel, initrd=img.initrd,
            root_disk=img.root_disk, memory_mib=s.vm.memory_mib, smp=s.vm.smp,
            accel=s.vm.accel,  # type: ignore[arg-type]
            nvdimms=[self.nvdimm], serial_ports=[SerialPort(EVENTS_PORT, events)],
        )
        vm = VM(config, state_dir, client_key=img.client_key, known_hosts=img.known_hosts)
        boot = _Boot(vm, events)
        t = time.monotonic()
        try:
            vm.start()
            self.command_lines.append(vm.argv)
            vm.wait_for_ssh(s.timeouts.boot_s)
        except BaseException:
            vm.cleanup()
            raise
        if k == 0:
            results.record_phase("first boot", time.monotonic() - t)
        return boot

    def _setup(self, boot: _Boot, results: RunResults) -> None:
        """First boot only: namespace, filesystem, deploy, format the target; manifest."""
        s, vm = self.scenario, boot.vm
        t = time.monotonic()
        self._progress(0, "setup")
        mode = NAMESPACE_MODE[(s.target.kind, s.target.namespace)]
        init_labels(vm)
        argv = ["ndctl", "create-namespace", "-r", "region0", "-m", mode]
        if mode == "sector":
            argv += ["-l", str(s.target.bsize)]  # the kernel BTT's sector size is the block
        self.device = device_path(json.loads(vm.succeed(*argv, timeout=120)))
        if s.target.kind == "btt8" and s.target.namespace == "fsdax":
            vm.succeed("mkfs.ext4", "-q", "-F", "-b", "4096", self.device, timeout=120)
        self._attach(boot)
        result = self._agent(vm, "prepare", {"target": self._target(), "lbas": s.workload.lbas},
                             s.timeouts.recover_s)
        if not result.get("ok"):
            raise CampaignError(f"preparing the target failed: {result}")
        self._update_manifest(guest_kernel=vm.succeed("uname", "-r").strip(),
                              accelerator=vm.accel, device=self.device,
                              target_nblock=result.get("nblock"),
                              image=image_mod.info(self.image))
        results.record_phase("setup", time.monotonic() - t)

    def _update_manifest(self, **facts: Any) -> None:
        path = self.results.run_dir / "manifest.json"
        write_json_atomic(path, {**json.loads(path.read_text()), **facts,
                                 "command_lines": self.command_lines})

    def _attach(self, boot: _Boot) -> None:
        """After every boot: wait for the namespace's device, mount the DAX filesystem, deploy."""
        s, vm = self.scenario, boot.vm
        assert self.device is not None
        vm.wait_until_succeeds("test", "-e", self.device, timeout=60)
        if s.target.kind == "btt8" and s.target.namespace == "fsdax":
            vm.succeed("mkdir", "-p", FSDAX_MOUNT)
            vm.succeed("mount", "-o", "dax", self.device, FSDAX_MOUNT, timeout=120)
        self._deploy(vm)

    def _deploy(self, vm: VM) -> None:
        """Copy btt8 + tbagent into the guest unless it already has this exact content."""
        have = vm.execute("cat", f"{GUEST_ROOT}/CONTENT_SHA256").stdout.strip()
        if have == self.guest_hash:
            return
        vm.succeed("rm", "-rf", GUEST_ROOT)
        vm.guest().put_dir(self.staged, GUEST_ROOT)

    def _recover(self, boot: _Boot) -> dict[str, Any]:
        """recover-and-dump; a recovery that hangs is `unrecoverable`, never a pass."""
        s = self.scenario
        config = {"target": self._target(), "seed": s.seed, "lbas": s.workload.lbas}
        try:
            return self._agent(boot.vm, "recover-and-dump", config, s.timeouts.recover_s)
        except VMError as e:
            if "timed out" in str(e):
                return {"ok": False, "error": f"recovery did not finish within "
                                              f"{s.timeouts.recover_s} s"}
            raise

    def _wait_trigger(self, boot: _Boot, cut: int, runner: _AgentRun) -> float:
        """Block until the cut is due; seconds from the round's `start` event to now."""
        when, s = self.scenario.cuts.when, self.scenario
        delay = s.cut_delay_s(cut)
        deadline = time.monotonic() + s.timeouts.workload_s
        started_at: float | None = None
        acked_writes = 0
        while True:
            finished = runner.finished  # sampled first: every event it wrote is read below
            for ev in _new_events(boot):
                if ev.get("epoch") != cut:
                    continue
                if ev.get("ev") == "start" and started_at is None:
                    started_at = time.monotonic()
                elif ev.get("ev") == "ok" and ev.get("kind") == "write":
                    acked_writes += 1
            now = time.monotonic()
            if started_at is not None:
                if delay is not None and now - started_at >= delay:
                    return now - started_at
                if when.after_acks is not None and acked_writes >= when.after_acks:
                    return now - started_at
            if finished:
                if runner.error is not None or started_at is None:
                    raise CampaignError(f"workload round {cut} ended before the cut: "
                                        f"{runner.error or 'it never started'}")
                return now - started_at  # ops exhausted before the trigger: cut it idle
            if now > deadline:
                raise CampaignError(
                    f"workload round {cut}: the cut trigger did not fire within "
                    f"{s.timeouts.workload_s} s (started: {started_at is not None}, "
                    f"acked writes: {acked_writes}); guest console tail:\n"
                    f"{boot.vm.console_tail(20)}")
            time.sleep(0.01)

    def _shutdown(self, boot: _Boot) -> None:
        s = self.scenario
        self._save_logs(boot, self.results.cut_dir(s.cuts.count), "recovery-")
        boot.vm.shutdown(timeout=10)

    # --- helpers ---

    def _target(self) -> dict[str, Any]:
        return self.scenario.agent_target(self._target_path())

    def _target_path(self) -> str:
        t = self.scenario.target
        assert self.device is not None
        if t.kind == "btt8" and t.namespace == "fsdax":
            return f"{FSDAX_MOUNT}/pool.btt8"
        return self.device

    def _agent_argv(self, command: str) -> list[str]:
        env = [f"{k}={v}" for k, v in sorted({"PYTHONPATH": GUEST_ROOT,
                                              **self.guest_env}.items())]
        return ["env", *env, "python3", "-m", "tbagent", command]

    def _agent(self, vm: VM, command: str, config: dict[str, Any],
               timeout: float) -> dict[str, Any]:
        r = vm.execute(*self._agent_argv(command), timeout=timeout,
                       stdin=json.dumps(config).encode())
        if r.rc != 0:
            raise CommandFailed(f"guest agent {command} failed", r)
        try:
            return json.loads(r.stdout)
        except ValueError as e:
            raise CampaignError(f"guest agent {command} printed no JSON: {r.stdout[-2000:]!r}"
                                f"\nstderr: {r.stderr[-2000:]}") from e

    def _save_logs(self, boot: _Boot, cut_dir: Path, prefix: str) -> None:
        (cut_dir / f"{prefix}qemu-cmdline.txt").write_text(shlex.join(boot.vm.argv) + "\n")
        for src, name in ((boot.vm.paths.console_log, "console.log"),
                          (boot.vm.paths.qmp_log, "qmp-events.log"),
                          (boot.vm.paths.stderr_log, "qemu.stderr")):
            if src.exists():
                shutil.copyfile(src, cut_dir / f"{prefix}{name}")


class _AgentRun:
    """The workload, run over SSH on its own thread: it ends when the power does."""

    def __init__(self, vm: VM, argv: list[str], config: dict[str, Any], timeout: float) -> None:
        self.error: str | None = None
        self.finished = False
        self._thread = threading.Thread(
            target=self._run, args=(vm, argv, json.dumps(config).encode(), timeout),
            name="workload", daemon=True)
        self._thread.start()

    def _run(self, vm: VM, argv: list[str], stdin: bytes, timeout: float) -> None:
        try:
            r = vm.execute(*argv, timeout=timeout, stdin=stdin)
            if r.rc != 0:
                self.error = f"rc {r.rc}: {r.stderr[-2000:]}"
        except Exception as e:  # the cut drops the connection: expected, judged elsewhere
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished = True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _new_events(boot: _Boot) -> list[dict[str, Any]]:
    """Complete event lines appended since the last call."""
    try:
        with open(boot.events, "rb") as f:
            f.seek(boot.events_read)
            data = f.read()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    boot.events_read += end
    out = []
    for line in data[:end].splitlines():
        with suppress(ValueError):
            out.append(json.loads(line))
    return out


def _save_events(src: Path, epoch: int, dst: Path) -> None:
    """This round's lines only (with cut mode reset one file spans every round)."""
    keep = []
    for line in src.read_bytes().splitlines(keepends=True) if src.exists() else []:
        try:
            if json.loads(line).get("epoch") == epoch:
                keep.append(line)
        except ValueError:
            keep.append(line)  # a line the cut truncated: evidence, the oracle skips it
    dst.write_bytes(b"".join(keep))


def _stage_guest_packages(dst: Path) -> tuple[Path, str]:
    """A clean copy of guest/{btt8,tbagent} (no caches) and the hash of its content."""
    digest = hashlib.sha256()
    for package in ("btt8", "tbagent"):
        for src in sorted((GUEST_PACKAGES / package).rglob("*.py")):
            rel = src.relative_to(GUEST_PACKAGES)
            data = src.read_bytes()
            digest.update(str(rel).encode() + b"\0" + data)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(data)
    content = digest.hexdigest()
    (dst / "CONTENT_SHA256").write_text(content + "\n")
    return dst, content


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(scenario_path: str | Path, results_root: str | Path = "results",
        guest_env: dict[str, str] | None = None) -> int:
    """Run a campaign; the exit code (0 clean, 1 violations, 2 testbed failure)."""
    path = Path(scenario_path)
    scenario = load_scenario(path)
    return Campaign(scenario, path, Path(results_root), guest_env=dict(guest_env or {})).run()


def replay(cut_dir: Path, accel: str = "auto") -> int:
    """Boot a guest on a copy of a cut's crash image (the evidence is never written), deploy
    btt8 + tbagent, and open an interactive shell; the guest stops when the shell exits."""
    crash = cut_dir / "crash.img"
    scenario_file = cut_dir.parent / "scenario.yaml"
    if not crash.is_file() or not scenario_file.is_file():
        print(f"testbed: {cut_dir} has no crash image (kept only for cuts with violations) "
              f"or its run has no scenario.yaml", file=sys.stderr)
        return 2
    scenario = load_scenario(scenario_file)
    img = image_mod.build()
    with tempfile.TemporaryDirectory(prefix="testbed-replay-") as tmp:
        work = Path(tmp)
        nvdimm = NvdimmSpec(copy_crash_image(crash, work / "nvdimm0.img"),
                            scenario.vm.nvdimm.size_mib * MiB, scenario.vm.nvdimm.label_kib * 1024)
        config = VMConfig(name="replay", kernel=img.kernel, initrd=img.initrd,
                          root_disk=img.root_disk, memory_mib=scenario.vm.memory_mib,
                          smp=scenario.vm.smp, accel=accel,  # type: ignore[arg-type]
                          nvdimms=[nvdimm])
        with VM(config, work / "vm", client_key=img.client_key,
                known_hosts=img.known_hosts) as vm:
            vm.start()
            vm.wait_for_ssh(scenario.timeouts.boot_s)
            staged, _ = _stage_guest_packages(work / "guest")
            vm.guest().put_dir(staged, GUEST_ROOT)
            devices = [device_path(ns) for ns in namespaces(vm) if "uuid" in ns]
            print(f"crash image of {cut_dir} on {', '.join(devices) or 'no namespace'}; "
                  f"try: PYTHONPATH={GUEST_ROOT} python3 -m btt8 check "
                  f"{devices[0] if devices else 'DEVICE'}", file=sys.stderr)
            assert vm.ssh_port is not None
            return subprocess.call(plain_ssh_argv(vm.ssh_port, img.client_key, img.known_hosts))
