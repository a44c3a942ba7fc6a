"""`testbed run SCENARIO`: the power-cut campaign loop.

Data flows one way: scenario -> VM -> guest agent -> cut -> recovery -> verdict -> results.
The first boot creates the target's namespace and formats it; then each cut round runs the
workload, cuts the power when the trigger fires, restarts the machine (testbed.restart),
recovers and dumps the target, and judges the round (testbed.oracle). What is specific to a
target lives in its driver (testbed.targets), what is specific to a cut mode in its restart
strategy.

Acks stream from the guest agent through a virtio-serial port whose host side is a plain file:
a blocking write to the port returns only after QEMU took the bytes, so an event the guest got
past is on the host before the cut (hence `unseen_ops=0` for the oracle).

Exit codes: 0 no violation; 1 a violation was found (whatever happened after it); 2 anything
else went wrong (one line says what and where; summary.json says `failed` with the reason).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import events as events_mod
from testbed import image as image_mod
from testbed import oracle
from testbed.clients import make_client
from testbed.guest_agent import Agent, Background, stage
from testbed.nvdimm import MiB, NvdimmSpec
from testbed.report import publish
from testbed.restart import RESTARTS, Machine
from testbed.results import (
    CONSOLE_LOG,
    EVENTS,
    QMP_LOG,
    RECOVERY,
    RunResults,
    describe_failure,
    progress_line,
    write_json_atomic,
)
from testbed.scenario import Scenario, load_scenario
from testbed.targets import TargetUnrecoverable, make_target
from testbed.vm import VM, SerialPort, qemu_version

EVENTS_PORT = "tb.events"
EVENTS_DEVICE = f"/dev/virtio-ports/{EVENTS_PORT}"

log = logging.getLogger(__name__)


class CampaignError(Exception):
    """The testbed itself failed (not a verdict on the target): exit 2, never a pass."""


@dataclass
class Phases:
    """Seconds per phase: `with phases("boot"):` times one. `current` keeps naming the phase
    an exception escaped from, for the failure message."""

    seconds: dict[str, float] = field(default_factory=dict)
    current: str = "start"
    on_enter: Callable[[str], None] = lambda name: None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        self.on_enter(name)
        start = time.monotonic()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start


@dataclass
class Campaign:
    scenario: Scenario
    scenario_path: Path
    results_root: Path
    say: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    # Test-only: environment for guest agent runs (TBAGENT_TEST_FAULT, BTT8_TEST_FAULT break
    # the target or the agent on purpose). Not reachable from the CLI or a scenario file.
    guest_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.scenario
        self.target = make_target(s.target)
        self.client = make_client(s.target.client)  # what drives the target, how it is judged
        self.restart = RESTARTS[s.cuts.mode]()
        self.resume = [0] * s.workload.threads  # next op index per thread, across rounds
        self.initial: dict[int, oracle.Decoded] = {}  # LBA values the last recovery pinned
        self.started = time.monotonic()
        self.violations = 0
        self.cuts_done = 0
        self.cut_seconds = 0.0  # spent in finished cut rounds, for the ETA
        self.stopped = False  # a cut left the target unrecoverable and the scenario says stop
        self.where = "start"  # for the failure message: "setup", "cut 3 recover", ...
        self.command_lines: list[list[str]] = []

    # --- the run ---

    def run(self) -> int:
        """The campaign; its exit code. Never raises (but KeyboardInterrupt is recorded)."""
        s = self.scenario
        try:
            results = RunResults.create(self.results_root, s, self.scenario_path, {})
        except OSError as e:
            self.say(f"testbed: cannot create a run folder under {self.results_root}: {e}")
            return 2
        self.results = results
        self.say(f"run {results.run_dir}")
        self.work = Path(tempfile.mkdtemp(prefix="testbed-run-"))
        self.nvdimm = NvdimmSpec(self.work / "nvdimm0.img", s.vm.nvdimm.size_mib * MiB,
                                 s.vm.nvdimm.label_kib * 1024)
        self.machine: Machine | None = None  # the guest running now, whatever phase fails
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            run_phases = Phases(on_enter=lambda name: self._progress(0, name))
            with run_phases("image"):
                self._update_manifest(qemu_version=qemu_version())
                self.image = image_mod.build(log=self.say)
                self.agent = Agent(*stage(self.work / "guest"), env=self.guest_env)
                self._update_manifest(guest_package_sha256=self.agent.content_hash)
            with run_phases("first boot"):
                self.machine = self._boot(0)
            with run_phases("setup"):
                self._setup(self.machine)
            for name, seconds in run_phases.seconds.items():
                results.record_phase(name, seconds)
            for cut in range(1, s.cuts.count + 1):
                self._cut_round(cut, self.machine)
                if self.stopped:
                    break
            with run_phases("shutdown"):
                self._save_logs(self.machine, results.cut_dir(self.cuts_done), "recovery-")
                self.machine.vm.shutdown(timeout=10)
        except KeyboardInterrupt:
            results.record_failure("interrupted")
        except Exception as e:
            summary, detail = describe_failure(self.where, e)
            results.record_failure(summary, detail)
            self.say(f"testbed: {summary}" + (f" (details: {results.run_dir / 'failure.txt'})"
                                              if detail else ""))
            log.debug("failure", exc_info=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.machine is not None:
                self.machine.vm.cleanup()  # never leave a QEMU behind, whatever happened
            shutil.rmtree(self.work, ignore_errors=True)
            self._update_manifest()  # every boot's QEMU command line
        code = results.finish()
        publish(results.run_dir)
        done = results.summary()
        self.say(f"{done['status']}: {done['cuts']}/{s.cuts.count} cuts done, "
                 f"{done['cuts_with_violations']} with violations"
                 f"{' ' + json.dumps(done['violations']) if done['violations'] else ''}, "
                 f"{done['cuts_per_min']} cuts/min -> {results.run_dir / 'report.html'}")
        return code

    def _cut_round(self, cut: int, machine: Machine) -> None:
        """Workload round `cut` on `machine`, the cut, the restart, recovery, the verdict;
        self.machine is the guest that comes back."""
        s, results, cut_dir = self.scenario, self.results, self.results.cut_dir(cut)
        phases = Phases(on_enter=lambda name: self._progress(cut, name))
        config = s.workload_config(self.target.agent_target(), EVENTS_DEVICE, cut, self.resume)
        crash_image = self.work / "crash.img"
        with phases("workload"):
            runner = self.agent.start(machine.vm, "workload", config, s.timeouts.workload_s + 30)
            cut_at_s = self._wait_trigger(machine, cut, runner)
            self.client.before_cut(machine, cut)
        with phases("cut"):
            self.restart.cut(machine, self.nvdimm.backing, crash_image)
            runner.join(10)
            events_mod.save_round(machine.events, cut, cut_dir / EVENTS)
            self._save_logs(machine, cut_dir, "")
        with phases("boot"):
            self.machine = machine = self.restart.restart(machine, lambda: self._boot(cut),
                                                          s.timeouts.boot_s)
        with phases("recover"):
            recovery = self._recover(machine.vm)
            write_json_atomic(cut_dir / RECOVERY, recovery)
        with phases("judge"):
            events = events_mod.read(cut_dir / EVENTS)
            verdict = self.client.judge(config, events, recovery, self.initial)
            self.resume = oracle.next_resume(events, config["resume"])
        results.record_cut(cut, verdict.to_json(), phases.seconds, crash_image=crash_image,
                           cut_at_s=cut_at_s)
        publish(results.run_dir)
        crash_image.unlink()
        self.cuts_done = cut
        self.cut_seconds += sum(phases.seconds.values())
        counts = verdict.counts()
        self.violations += sum(counts.values())
        self.say(f"cut {cut}: {'ok' if verdict.ok else 'VIOLATIONS ' + json.dumps(counts)}"
                 f" (cut {cut_at_s:.2f} s into the workload)")
        self.initial = oracle.initial_state(recovery)
        if not recovery.get("ok"):
            self._unrecoverable(cut, machine)

    def _unrecoverable(self, cut: int, machine: Machine) -> None:
        """The target cannot be opened, so no later round can run on it: stop (the default)
        or, if the scenario asks, reformat it and go on from all-zero blocks."""
        if self.scenario.cuts.on_unrecoverable == "reformat":
            self.where = f"cut {cut} reformat"
            self.say(f"cut {cut}: target unrecoverable; reformatting it "
                     f"(cuts.on_unrecoverable: reformat)")
            self._format(machine.vm)
            self.initial = {}
            return
        note = (f"campaign stopped after cut {cut}: the target is unrecoverable "
                f"(cuts.on_unrecoverable: stop)")
        self.say(note)
        self.results.record_stop(note)
        self.stopped = True

    # --- phases ---

    def _progress(self, cut: int, phase: str) -> None:
        self.where = f"cut {cut} {phase}" if cut else phase
        log.info("phase %s", self.where)
        elapsed = time.monotonic() - self.started
        eta = None
        if self.cuts_done:
            eta = self.cut_seconds / self.cuts_done * (self.scenario.cuts.count - self.cuts_done)
        self.say(progress_line(cut, self.scenario.cuts.count, phase, elapsed, self.violations,
                               eta))

    def _boot(self, k: int) -> Machine:
        """Start QEMU on the campaign's NVDIMM backing file; ssh-ready within boot_s."""
        s = self.scenario
        state_dir = Path(tempfile.mkdtemp(prefix=f"boot{k}-", dir=self.work))
        events = state_dir / "events.jsonl"
        vm = VM.from_image(self.image, f"tb-{s.name}-{k}"[:63], state_dir,
                           memory_mib=s.vm.memory_mib, smp=s.vm.smp, accel=s.vm.accel,
                           nvdimms=[self.nvdimm], serial_ports=[SerialPort(EVENTS_PORT, events)])
        try:
            vm.start()
            self.command_lines.append(vm.argv)
            vm.wait_for_ssh(s.timeouts.boot_s)
        except BaseException:
            vm.cleanup()
            raise
        return Machine(vm, events)

    def _setup(self, machine: Machine) -> None:
        """First boot only: the target's namespace and setup, deploy, format; manifest."""
        vm = machine.vm
        device = self.target.create_namespace(vm)
        self.target.setup(vm)
        nblock = self._format(vm)
        self._update_manifest(guest_kernel=vm.succeed("uname", "-r").strip(),
                              accelerator=vm.accel, device=device, target_nblock=nblock,
                              image=image_mod.info(self.image))

    def _format(self, vm: VM) -> int:
        """Attach the target and make every working-set LBA read as zero."""
        self.target.attach(vm)
        self.agent.deploy(vm)
        s = self.scenario
        result = self.agent.run(vm, "prepare", {"target": self.target.agent_target(),
                                                "lbas": s.workload.lbas}, s.timeouts.recover_s)
        if not result.get("ok"):
            raise CampaignError(f"preparing the target failed: {result}")
        return int(result.get("nblock", 0))

    def _recover(self, vm: VM) -> dict[str, Any]:
        """recover-and-dump: an open that fails is an `unrecoverable` verdict; one that hangs
        past recover_s raises VMTimeout, a testbed failure (a hung guest and a hung recovery
        look alike from here, and neither is a pass). An attach that refuses the target
        (TargetUnrecoverable) is an `unrecoverable` verdict too."""
        try:
            self.target.attach(vm)
        except TargetUnrecoverable as e:
            return {"ok": False, "error": f"attach: {e}"}
        self.agent.deploy(vm)
        s = self.scenario
        config = {"target": self.target.agent_target(), "seed": s.seed, "lbas": s.workload.lbas,
                  **self.client.recover_config()}
        return self.agent.run(vm, "recover-and-dump", config, s.timeouts.recover_s)

    def _wait_trigger(self, machine: Machine, cut: int, runner: Background) -> float:
        """Block until the cut is due; seconds from the round's `start` event to now."""
        s = self.scenario
        delay, after_acks = s.cut_delay_s(cut), s.cuts.when.after_acks
        deadline = time.monotonic() + s.timeouts.workload_s
        started_at: float | None = None
        acked_writes = 0
        while True:
            finished = runner.finished  # sampled first: every event it wrote is read below
            for ev in machine.tail.new():
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
                if after_acks is not None and acked_writes >= after_acks:
                    return now - started_at
            if finished:
                if runner.error is not None or started_at is None:
                    raise CampaignError(f"the workload ended before the cut: "
                                        f"{runner.error or 'it never started'}")
                return now - started_at  # ops exhausted before the trigger: cut it idle
            if now > deadline:
                raise CampaignError(
                    f"the cut trigger did not fire within {s.timeouts.workload_s} s "
                    f"(started: {started_at is not None}, acked writes: {acked_writes}); "
                    f"guest console tail:\n{machine.vm.console_tail(20)}")
            time.sleep(0.01)

    # --- records ---

    def _update_manifest(self, **facts: Any) -> None:
        path = self.results.run_dir / "manifest.json"
        write_json_atomic(path, {**json.loads(path.read_text()), **facts,
                                 "command_lines": self.command_lines})

    def _save_logs(self, machine: Machine, cut_dir: Path, prefix: str) -> None:
        vm = machine.vm
        (cut_dir / f"{prefix}qemu-cmdline.txt").write_text(shlex.join(vm.argv) + "\n")
        for src, name in ((vm.paths.console_log, CONSOLE_LOG),
                          (vm.paths.qmp_log, QMP_LOG),
                          (vm.paths.stderr_log, "qemu.stderr")):
            if src.exists():
                shutil.copyfile(src, cut_dir / f"{prefix}{name}")


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(scenario_path: str | Path, results_root: str | Path = "results",
        guest_env: dict[str, str] | None = None) -> int:
    """Run a campaign; the exit code (0 clean, 1 violations, 2 testbed failure)."""
    path = Path(scenario_path)
    scenario = load_scenario(path)
    return Campaign(scenario, path, Path(results_root), guest_env=dict(guest_env or {})).run()
