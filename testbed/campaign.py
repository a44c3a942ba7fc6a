"""`testbed run SCENARIO`: the power-cut campaign loop.

Data flows one way: scenario -> VM -> guest agent -> cut -> recovery -> verdict -> results.
The first boot creates the target's namespace and formats it; then each cut round runs the
workload, cuts the power when the trigger fires, restarts the machine (testbed.restart),
recovers and dumps the target, and judges the round (testbed.oracle). What is specific to a
target lives in its driver (testbed.targets), what is specific to a cut mode in its restart
strategy. `--jobs N` runs N chains of rounds at once, each on its own guest and media.
`--resume RUN_DIR` goes on from each chain's last finished cut (testbed.resume).

Acks stream from the guest agent through a virtio-serial port whose host side is a plain file:
a blocking write to the port returns only after QEMU took the bytes, so an event the guest got
past is on the host before the cut (hence `unseen_ops=0` for the oracle).

Exit codes: 0 no violation; 1 a violation was found (whatever happened after it); 2 anything
else went wrong (one line says what and where; summary.json says `failed` with the reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from testbed import accel as accel_mod
from testbed import events as events_mod
from testbed import image as image_mod
from testbed import oracle, snapshot, workdir
from testbed import resume as resume_mod
from testbed import targets as targets_mod
from testbed.channel import AgentChannel
from testbed.clients import make_client
from testbed.guest_agent import Agent, Background, stage
from testbed.nvdimm import MiB, NvdimmSpec, copy_crash_image
from testbed.report import publish
from testbed.restart import RESTARTS, Machine, Restart, SnapshotRestart
from testbed.results import (
    CONSOLE_LOG,
    EVENTS,
    QMP_LOG,
    RECOVERY,
    RunResults,
    Shard,
    describe_failure,
    progress_line,
    write_json_atomic,
)
from testbed.scenario import Scenario, load_scenario
from testbed.targets import Target, TargetUnrecoverable, make_target
from testbed.vm import VM, SerialPort, VMError, VMTimeout, qemu_version

EVENTS_PORT = "tb.events"
EVENTS_DEVICE = f"/dev/virtio-ports/{EVENTS_PORT}"
AGENT_PORT = "tb.agent"  # the resident agent's requests and answers
AGENT_DEVICE = f"/dev/virtio-ports/{AGENT_PORT}"
PUBLISH_EVERY_S = 30.0

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
class Chain:
    """One chain of cut rounds: its own guest, NVDIMM backing file, root overlay and per-thread
    op offsets, running its share of the cut numbers in order (each round starts from the
    media the chain's previous round left)."""

    index: int
    cuts: list[int]
    work: Path
    nvdimm: NvdimmSpec
    target: Target
    restart: Restart
    resume: list[int]  # next op index per workload thread, across rounds
    initial: dict[int, oracle.Decoded] = field(default_factory=dict)  # the last recovery's
    machine: Machine | None = None  # the guest running now, whatever phase fails
    where: str = "start"  # for the failure message: "setup", "cut 3 recover", ...
    last_cut: int = 0  # the last finished round (its folder gets the final logs)
    stopped: bool = False  # a cut left the target unrecoverable and the scenario says stop

    @property
    def overlay(self) -> Path:
        return self.work / "root.qcow2"


@dataclass
class Campaign:
    scenario: Scenario
    scenario_path: Path
    results_root: Path
    say: Callable[[str], None] = field(default=lambda m: _to_stderr(m))
    # Test-only: environment for guest agent runs (TBAGENT_TEST_FAULT, BTT8_TEST_FAULT break
    # the target or the agent on purpose). Not reachable from the CLI or a scenario file.
    guest_env: dict[str, str] = field(default_factory=dict)
    shard: Shard | None = None  # run only this deterministic slice of the cuts
    jobs: int = 1  # chains of rounds at once
    resumed: resume_mod.Resumed | None = None  # `--resume`: the run folder and where it stood

    def __post_init__(self) -> None:
        self.client = make_client(self.scenario.target.client)  # drives and judges the target
        self.started = time.monotonic()
        self.violations = 0
        self.cut_seconds = 0.0  # spent in finished cut rounds, for the ETA
        self.session_cuts = 0  # cut rounds finished by this process, for the ETA
        self.chains: list[Chain] = []
        self.lock = threading.Lock()  # results, manifest and counters are shared by chains
        self.abort = threading.Event()  # a chain failed: the others stop after their round
        self.command_lines: list[list[str]] = []
        self.published = 0.0  # when report.html was last rendered

    # --- the run ---

    def run(self) -> int:
        """The campaign; its exit code. Never raises (but KeyboardInterrupt is recorded)."""
        s = self.scenario
        if self.resumed is not None:
            results = self.resumed.results
            self.command_lines = list(self.resumed.command_lines)
        else:
            try:
                results = RunResults.create(self.results_root, s, self.scenario_path,
                                            {"jobs": self.jobs}, shard=self.shard)
            except OSError as e:
                self.say(f"testbed: cannot create a run folder under {self.results_root}: {e}")
                return 2
        self.results = results
        self.violations = sum(sum(c["counts"].values()) for c in results.cuts)
        self.say(f"{'resume' if self.resumed else 'run'} {results.run_dir}")
        for stale in workdir.remove_abandoned():
            self.say(f"removed {stale} (the temp folder of a testbed run that died)")
        # Named after the run: `ps` tells which run a QEMU (whose state lives here) belongs to.
        self.workdir = workdir.create(results.run_dir.name)
        self.work = self.workdir.path
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        live = [j for j in range(self.jobs) if self._chain_cuts(j)]  # all but on a resume
        first = self._chain(live[0])
        try:
            phases = Phases(on_enter=lambda name: self._progress(first, 0, name))
            with phases("image"):
                self._update_manifest(qemu_version=qemu_version())
                self.image = image_mod.build(log=self.say)
                self.agent = Agent(*stage(self.work / "guest"), env=self.guest_env)
                self._update_manifest(guest_package_sha256=self.agent.content_hash)
            results.record_phase("image", phases.seconds["image"])
            self.cache = self._snapshot_cache(first.restart)
            # The first chain sets up (and fills the snapshot cache) before the others start.
            self._start(first)
            self.chains = [first] + [self._chain(j) for j in live[1:]]
            workers = [threading.Thread(target=self._chain_main, args=(chain,),
                                        name=f"chain-{chain.index}", daemon=True)
                       for chain in self.chains[1:]]
            for worker in workers:
                worker.start()
            self._rounds(first)
            for worker in workers:
                worker.join()
        except KeyboardInterrupt:
            self.abort.set()
            results.record_failure("interrupted")
        except Exception as e:
            self._fail(first, e)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.abort.set()
            for chain in self.chains or [first]:
                if chain.machine is not None:
                    chain.machine.vm.cleanup()  # never leave a QEMU behind, whatever happened
            self.workdir.remove()
            self._update_manifest()  # every boot's QEMU command line
        code = results.finish()
        publish(results.run_dir)
        done = results.summary()
        self.say(f"{done['status']}: {done['cuts']}/{done['cuts_planned']} cuts done, "
                 f"{done['cuts_with_violations']} with violations"
                 f"{' ' + json.dumps(done['violations']) if done['violations'] else ''}, "
                 f"{done['cuts_per_min']} cuts/min -> {results.run_dir / 'report.html'}")
        if done["cuts"] < done["cuts_planned"] and not done["stopped"]:
            self.say(f"testbed run --resume {results.run_dir} goes on from the last finished "
                     f"cut")
        return code

    def _chain_cuts(self, j: int) -> list[int]:
        """Chain j takes every jobs-th of this run's cuts (those not finished yet)."""
        done = {c["cut"] for c in self.results.cuts}
        return [cut for cut in self.results.planned[j::self.jobs] if cut not in done]

    def _chain(self, j: int) -> Chain:
        s = self.scenario
        work = self.work / f"chain-{j + 1}"
        work.mkdir()
        return Chain(j + 1, self._chain_cuts(j), work,
                     NvdimmSpec(work / "nvdimm0.img", s.vm.nvdimm.size_mib * MiB,
                                s.vm.nvdimm.label_kib * 1024),
                     make_target(s.target), RESTARTS[s.cuts.restart](),
                     [0] * s.workload.threads)

    def _chain_main(self, chain: Chain) -> None:
        """A chain of its own thread: a failure is recorded and stops the others."""
        try:
            self._start(chain)
            self._rounds(chain)
        except Exception as e:
            self._fail(chain, e)

    def _start(self, chain: Chain) -> None:
        """The chain's first guest: restored from a cached snapshot of this exact setup, or
        booted and set up (which fills the cache when the restart strategy snapshots)."""
        phases = Phases(on_enter=lambda name: self._progress(chain, 0, name))
        facts = self.cache.facts() if self.cache is not None else None
        if self.cache is not None and facts is not None:
            with phases("snapshot load"):
                self.cache.install(chain.overlay, chain.nvdimm.backing)
                chain.machine = self._boot(chain, 0, restore=True)
                chain.target.device = facts["device"]
                chain.target.attach(chain.machine.agent)
                self._update_manifest(**facts, snapshot=str(self.cache.dir))
        else:
            with phases("first boot"):
                chain.machine = self._boot(chain, 0)
            with phases("setup"):
                self._setup(chain)
        with self.lock:
            for name, seconds in phases.seconds.items():
                self.results.record_phase(name, seconds)
        point = self.resumed.points.get(chain.index) if self.resumed else None
        if point is not None:
            self._restore(chain, point)

    def _restore(self, chain: Chain, point: resume_mod.ResumePoint) -> None:
        """--resume: the chain's media as its last finished cut's recovery left them, by
        recovering that cut's crash image again in a new guest (which must find what the run
        recorded); the oracle's initial values and the op offsets as they were after it."""
        assert chain.machine is not None
        phases = Phases(on_enter=lambda name: self._progress(chain, point.cut, name))
        with phases("resume"):
            chain.machine.agent.close()
            chain.machine.vm.crash("quit")
            chain.machine = None
            copy_crash_image(point.image, chain.nvdimm.backing)
            chain.machine = self._boot(chain, point.cut, restore=chain.restart.chain_overlay)
            recovery = self._recover(chain)
        recorded = json.loads((self.results.cut_dir(point.cut) / RECOVERY).read_text())
        for key in ("ok", "blocks", "nblock"):
            if recovery.get(key) != recorded.get(key):
                raise CampaignError(f"recovering cut {point.cut}'s crash image again gave "
                                    f"another `{key}` than the run recorded: the media cannot "
                                    f"be restored as they were")
        with self.lock:
            self.results.record_phase("resume", phases.seconds["resume"])
        chain.resume, chain.last_cut = point.resume, point.cut
        chain.initial = oracle.initial_state(recovery)
        self.say(f"{self._tag(chain)}cut {point.cut}: media restored from its crash image")
        if not recovery.get("ok"):
            self._unrecoverable(chain, point.cut)

    def _rounds(self, chain: Chain) -> None:
        for cut in chain.cuts:
            if self.abort.is_set() or chain.stopped:
                return
            self._cut_round(chain, cut)
        assert chain.machine is not None
        with Phases(on_enter=lambda name: self._progress(chain, 0, name))("shutdown"):
            self._save_logs(chain.machine, self.results.cut_dir(chain.last_cut), "recovery-")
            chain.machine.vm.shutdown(timeout=10)
        chain.machine = None

    def _fail(self, chain: Chain, error: Exception) -> None:
        """A testbed failure in `chain`: one line, details to failure.txt, the others stop."""
        self.abort.set()
        summary, detail = describe_failure(chain.where, error)
        if chain.machine is not None and "guest console" not in detail:
            # a hung guest or agent: what the guest said last is the evidence
            detail += ("\n" if detail else "") + ("guest console (last lines):\n"
                                                  + chain.machine.vm.console_tail(30))
        if self.jobs > 1:
            summary = f"chain {chain.index} {summary}"
        with self.lock:
            first = self.results.failure is None
            if first:
                self.results.record_failure(summary, detail)
        self.say(f"testbed: {summary}" + (f" (details: {self.results.run_dir / 'failure.txt'})"
                                          if detail and first else ""))
        log.debug("failure", exc_info=True)

    def _cut_round(self, chain: Chain, cut: int) -> None:
        """Workload round `cut` on the chain's guest, the cut, the restart, recovery, the
        verdict; chain.machine is the guest that comes back."""
        s, results, cut_dir = self.scenario, self.results, self.results.cut_dir(cut)
        machine, target = chain.machine, chain.target
        assert machine is not None
        phases = Phases(on_enter=lambda name: self._progress(chain, cut, name))
        create = s.cuts.during == "create"  # the round formats the target; the cut lands there
        if create:
            command, config = "create", s.create_config(target.agent_target(), EVENTS_DEVICE, cut)
        else:
            command = "workload"
            config = s.workload_config(target.agent_target(), EVENTS_DEVICE, cut, chain.resume)
        crash_image = results.resume_image(chain.index, cut)  # the resume point, once recorded
        with phases(command):
            runner = self.agent.start(machine.agent, command, config, s.timeouts.workload_s + 30)
            cut_at_s, step = self._wait_trigger(machine, cut, runner, config.get("at_step"))
            if not create:
                self.client.before_cut(machine, cut)
        with phases("cut"):
            chain.restart.cut(machine, chain.nvdimm.backing, crash_image)
            machine.agent.cancel_pending()  # the workload's request: its guest is gone
            runner.join(10)
            round_end = events_mod.save_round(machine.events, machine.round_start,
                                              cut_dir / EVENTS)
            machine.next_round(round_end)
            self._save_logs(machine, cut_dir, "")
        with phases(chain.restart.phase):
            chain.machine = machine = chain.restart.restart(
                machine, lambda restore: self._boot(chain, cut, restore), s.timeouts.boot_s)
            self._agent_up(machine)
        with phases("recover"):
            recovery = self._recover(chain)
            write_json_atomic(cut_dir / RECOVERY, recovery)
        # The agent times its read-only btt8 check inside recover-and-dump: its own phase.
        check_s = min(float(recovery.pop("check_s", 0.0)), phases.seconds["recover"])
        phases.seconds["recover"] -= check_s
        phases.seconds["check"] = check_s
        with phases("judge"):
            events = events_mod.read(cut_dir / EVENTS)
            if create:
                verdict = oracle.judge_create(cut, recovery, chain.initial)
            else:
                verdict = self.client.judge(config, events, recovery, chain.initial)
                chain.resume = oracle.next_resume(events, config["resume"])
        record = verdict.to_json() if step is None else {**verdict.to_json(), "step": step}
        with self.lock:
            results.record_cut(cut, record, phases.seconds, crash_image=crash_image,
                               cut_at_s=cut_at_s, worker=chain.index)
            # summary.json is current after every cut; the report and JUnit (rendered from the
            # whole folder, ~50 ms a cut) at most every PUBLISH_EVERY_S, and at the end.
            if time.monotonic() - self.published >= PUBLISH_EVERY_S:
                publish(results.run_dir)
                self.published = time.monotonic()
            results.keep_resume_point(chain.index, cut)
            self.cut_seconds += sum(phases.seconds.values())
            self.session_cuts += 1
            self.violations += sum(verdict.counts().values())
        chain.last_cut = cut
        counts = verdict.counts()
        self.say(f"{self._tag(chain)}cut {cut}: "
                 f"{'ok' if verdict.ok else 'VIOLATIONS ' + json.dumps(counts)}"
                 f" ({_where(step)}{cut_at_s:.2f} s into the {command})")
        chain.initial = oracle.initial_state(recovery)
        if create and recovery.get("not_a_pool"):
            self._format(chain, machine.agent)  # the cut left no pool: the next round needs one
        elif not recovery.get("ok"):
            self._unrecoverable(chain, cut)

    def _unrecoverable(self, chain: Chain, cut: int) -> None:
        """The target cannot be opened, so no later round can run on it: stop (the default)
        or, if the scenario asks, reformat it and go on from all-zero blocks."""
        assert chain.machine is not None
        if self.scenario.cuts.on_unrecoverable == "reformat":
            chain.where = f"cut {cut} reformat"
            self.say(f"{self._tag(chain)}cut {cut}: target unrecoverable; reformatting it "
                     f"(cuts.on_unrecoverable: reformat)")
            self._format(chain, chain.machine.agent)  # attached already, for the recovery
            chain.initial = {}
            return
        note = (f"campaign stopped after cut {cut}: the target is unrecoverable "
                f"(cuts.on_unrecoverable: stop)")
        self.say(f"{self._tag(chain)}{note}")
        with self.lock:
            self.results.record_stop(note)
        chain.stopped = True

    # --- phases ---

    def _tag(self, chain: Chain) -> str:
        return f"[{chain.index}] " if self.jobs > 1 else ""

    def _progress(self, chain: Chain, cut: int, phase: str) -> None:
        chain.where = f"cut {cut} {phase}" if cut else phase
        log.info("phase %s%s", self._tag(chain), chain.where)
        elapsed = time.monotonic() - self.started
        left = len(self.results.planned) - len(self.results.cuts)
        eta = None
        if self.session_cuts:  # chains run side by side: their finished rounds' time over jobs
            eta = self.cut_seconds / self.session_cuts * left / self.jobs
        self.say(self._tag(chain) + progress_line(cut, self.scenario.cuts.count, phase, elapsed,
                                                  self.violations, eta))

    def _boot(self, chain: Chain, k: int, restore: bool = False) -> Machine:
        """Start QEMU on the chain's NVDIMM backing file, booting or (restore) loading the
        chain's snapshot; its resident agent answering within boot_s."""
        s = self.scenario
        state_dir = Path(tempfile.mkdtemp(prefix=f"boot{k}-", dir=chain.work))
        events, agent_socket = state_dir / "events.jsonl", state_dir / "agent.sock"
        name = f"tb-{s.name}-{chain.index}-{k}" if self.jobs > 1 else f"tb-{s.name}-{k}"
        vm = VM.from_image(self.image, name[:63], state_dir,
                           memory_mib=s.vm.memory_mib, smp=s.vm.smp, accel=s.vm.accel,
                           nvdimms=[chain.nvdimm],
                           serial_ports=[SerialPort(EVENTS_PORT, events),
                                         SerialPort(AGENT_PORT, agent_socket, socket=True)],
                           root_overlay=chain.overlay if chain.restart.chain_overlay else None)
        machine = Machine(vm, events, AgentChannel(agent_socket), fresh=not restore)
        try:
            vm.start(paused=restore)
            with self.lock:
                self.command_lines.append(vm.argv)
            if restore:
                snapshot.load(vm)  # the snapshot's agent is running, waiting on its port
            else:
                vm.wait_for_ssh(s.timeouts.boot_s)
            self._agent_up(machine)
        except BaseException:
            machine.agent.close()
            vm.cleanup()
            raise
        return machine

    def _agent_up(self, machine: Machine) -> None:
        """A booted guest gets the packages and its resident agent (over SSH); a restored one
        has both. Either way the agent's port answers a ping before this returns."""
        booted = machine.fresh
        if machine.fresh:
            self.agent.deploy(machine.vm)
            self.agent.serve(machine.vm, AGENT_DEVICE)
            machine.fresh = False
        try:
            machine.agent.connect(self.scenario.timeouts.boot_s)
        except VMTimeout as e:
            if booted:  # SSH is up: is the agent dead, or is the port losing requests?
                with contextlib.suppress(VMError):
                    ps = machine.vm.execute("ps", timeout=30).stdout
                    e.message += "; guest processes:\n" + "\n".join(
                        line for line in ps.splitlines() if "tbagent" in line or "PID" in line)
            raise

    def _setup(self, chain: Chain) -> None:
        """First boot only: the target's namespace and setup, format, the restart strategy's
        preparation (a snapshot, kept in the cache); manifest."""
        assert chain.machine is not None
        vm, agent, target = chain.machine.vm, chain.machine.agent, chain.target
        device = target.create_namespace(vm)
        target.setup(vm)
        target.attach(agent)
        facts = {"guest_kernel": vm.succeed("uname", "-r").strip(), "accelerator": vm.accel,
                 "device": device, "target_nblock": self._format(chain, agent)}
        cache = self.cache
        if cache is not None and isinstance(chain.restart, SnapshotRestart):
            chain.restart.on_saved = lambda: cache.store(chain.overlay, chain.nvdimm.backing,
                                                         facts)
        chain.restart.ready(chain.machine, target)
        self._update_manifest(**facts, image=image_mod.info(self.image))

    def _snapshot_cache(self, restart: Restart) -> snapshot.Cache | None:
        """Where a snapshot of this exact setup is kept across runs (snapshot restarts only)."""
        if not restart.chain_overlay:
            return None
        s, img = self.scenario, self.image
        return snapshot.Cache(snapshot.cache_root(), {
            "format": 2, "image": img.recipe_hash, "qemu": qemu_version(),
            "accel": accel_mod.resolve(s.vm.accel, img.kernel, img.initrd),
            "vm": asdict(s.vm), "target": asdict(s.target), "lbas": s.workload.lbas,
            "guest_packages": self.agent.content_hash, "guest_env": self.guest_env,
            "setup_code": _source_hash(targets_mod, snapshot, sys.modules[__name__]),
        })

    def _format(self, chain: Chain, agent: AgentChannel) -> int:
        """Make every working-set LBA of the attached target read zero."""
        s = self.scenario
        result = self.agent.run(agent, "prepare", {"target": chain.target.agent_target(),
                                                   "lbas": s.workload.lbas}, s.timeouts.recover_s)
        if not result.get("ok"):
            raise CampaignError(f"preparing the target failed: {result}")
        return int(result.get("nblock", 0))

    def _recover(self, chain: Chain) -> dict[str, Any]:
        """recover-and-dump: an open that fails is an `unrecoverable` verdict; one that hangs
        past recover_s raises VMTimeout, a testbed failure (a hung guest and a hung recovery
        look alike from here, and neither is a pass). An attach that refuses the target
        (TargetUnrecoverable) is an `unrecoverable` verdict too."""
        assert chain.machine is not None
        agent = chain.machine.agent
        try:
            chain.target.attach(agent)
        except TargetUnrecoverable as e:
            return {"ok": False, "error": f"attach: {e}"}
        s = self.scenario
        config = {"target": chain.target.agent_target(), "seed": s.seed,
                  "lbas": s.workload.lbas, **self.client.recover_config()}
        return self.agent.run(agent, "recover-and-dump", config, s.timeouts.recover_s)

    def _wait_trigger(self, machine: Machine, cut: int, runner: Background,
                      at_step: dict[str, Any] | None = None) -> tuple[float, dict[str, Any] | None]:
        """Block until the cut is due: seconds from the round's `start` event to now and, for
        an at_step cut, where it landed (the agent's `pause` event: a thread holding at the
        label) or that the round ended without reaching the step (`reached: false`)."""
        s = self.scenario
        step = None if at_step is None else {
            "label": at_step["label"], "nth": at_step["nth"],
            "thread": "any" if at_step["thread"] is None else at_step["thread"], "reached": False}
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
                elif ev.get("ev") == "pause" and step is not None and started_at is not None:
                    step.update(reached=True, at={k: ev.get(k) for k in ("thread", "op", "kind",
                                                                         "lba")})
                    return time.monotonic() - started_at, step
            now = time.monotonic()
            if started_at is not None:
                if delay is not None and now - started_at >= delay:
                    return now - started_at, step
                if after_acks is not None and acked_writes >= after_acks:
                    return now - started_at, step
            if finished:
                if runner.error is not None or started_at is None:
                    raise CampaignError(f"the workload ended before the cut: "
                                        f"{runner.error or 'it never started'}")
                # ops exhausted before the trigger (or the step never reached): cut it idle
                return now - started_at, step
            if now > deadline:
                raise CampaignError(
                    f"the cut trigger did not fire within {s.timeouts.workload_s} s "
                    f"(started: {started_at is not None}, acked writes: {acked_writes}); "
                    f"guest console tail:\n{machine.vm.console_tail(20)}")
            time.sleep(0.01)

    # --- records ---

    def _update_manifest(self, **facts: Any) -> None:
        path = self.results.run_dir / "manifest.json"
        with self.lock:
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



def _where(step: dict[str, Any] | None) -> str:
    """Where an at_step cut landed, for the progress line."""
    if step is None:
        return "cut "
    want = f"{step['label']} #{step['nth']}" + (
        "" if step["thread"] == "any" else f" of thread {step['thread']}")
    if not step["reached"]:
        return f"step {want} never reached: cut idle "
    at = step["at"]
    return f"cut at {want} (thread {at['thread']} op {at['op']} {at['kind']}), "


def _to_stderr(message: str) -> None:
    """Progress for the user; a closed terminal or pipe (`| head`) must not end the run."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


def _source_hash(*modules: ModuleType) -> str:
    """Hash of the code that sets a target up: a cached snapshot of older code is not used."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def default_jobs(memory_mib: int) -> int:
    """Chains that fit this machine: a TCG guest keeps about two cores busy, and each needs its
    RAM twice over (guest memory, page cache of its files)."""
    cores = os.cpu_count() or 1
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    return max(1, min(cores // 2, available // (2 * memory_mib)))


def run(scenario_path: str | Path, results_root: str | Path = "results",
        guest_env: dict[str, str] | None = None, shard: Shard | None = None,
        jobs: int | None = None) -> int:
    """Run a campaign; the exit code (0 clean, 1 violations, 2 testbed failure). jobs: chains
    at once (default: what fits the machine), never more than the cuts."""
    path = Path(scenario_path)
    scenario = load_scenario(path)
    planned = len((shard or Shard(1, 1)).cuts(scenario.cuts.count))
    jobs = max(1, min(jobs or default_jobs(scenario.vm.memory_mib), planned))
    return Campaign(scenario, path, Path(results_root), guest_env=dict(guest_env or {}),
                    shard=shard, jobs=jobs).run()


def resume(run_dir: str | Path, scenario_path: str | Path | None = None,
           jobs: int | None = None, guest_env: dict[str, str] | None = None) -> int:
    """Go on with an interrupted campaign in its run folder (testbed.resume); the exit code as
    for the whole run. ResumeError (exit 2) when it cannot be resumed."""
    resumed = resume_mod.prepare(Path(run_dir), Path(scenario_path) if scenario_path else None,
                                 jobs)
    results = resumed.results
    return Campaign(resumed.scenario, results.run_dir / "scenario.yaml", results.run_dir.parent,
                    guest_env=dict(guest_env or {}), shard=results.shard, jobs=resumed.jobs,
                    resumed=resumed).run()
