"""The `testbed` command line.

Each subcommand is a `_add_<name>(subparsers)` function that registers its parser and sets
`func`; adding one is a new function plus a line in COMMANDS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed import campaign, fleet, runtime
from testbed import image as image_mod
from testbed.guest_agent import Agent, stage
from testbed.ndctl import MODES, NdctlError, create_namespace, device_path, namespaces
from testbed.nvdimm import NvdimmError, NvdimmSpec, parse_size
from testbed.replay import replay
from testbed.report import MergeError, merge, publish, render_explore_report, write_explore_junit
from testbed.results import Shard
from testbed.resume import ResumeError
from testbed.scenario import ScenarioError
from testbed.ssh import SSHError, plain_ssh_argv
from testbed.targets import BTT8_BLK_NAME, BTT8CTL
from testbed.vm import VM, VMError

log = logging.getLogger("testbed")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


DEFAULT_NVDIMM = (256 << 20, "devdax")  # `testbed up` without --nvdimm: an NVDIMM testbed


def _parse_nvdimm(text: str) -> tuple[int, str | None]:
    """SIZE[:MODE] -> (bytes, mode or None)."""
    size, _, mode = text.partition(":")
    if mode and mode not in MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {', '.join(MODES)}")
    try:
        nbytes = parse_size(size)
        NvdimmSpec(Path("/"), nbytes)  # validates alignment
    except NvdimmError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return nbytes, mode or None


# --- up / ssh / status / down ---


def _bad_name(name: str) -> bool:
    """Validate a guest name once, up front, before any path is made from it."""
    try:
        runtime.check_name(name)
    except runtime.BadName as e:
        _say(f"testbed: {e}")
        return True
    return False


def _up(args: argparse.Namespace) -> int:
    name = args.name
    if _bad_name(name):
        return 2
    if runtime.qemu_pids(name):
        _say(f"testbed: guest {name} is already running (testbed down {name})")
        return 2
    t0 = time.monotonic()
    img = image_mod.build()
    data = runtime.data_dir(name)
    if args.no_nvdimm and (args.nvdimm or args.attach):
        _say("testbed up: --no-nvdimm leaves nothing for --nvdimm or --attach")
        return 2
    nvdimms = args.nvdimm or ([] if args.no_nvdimm else [DEFAULT_NVDIMM])
    specs = [NvdimmSpec(data / f"nvdimm{i}.img", size) for i, (size, _) in enumerate(nvdimms)]
    for s in specs:
        _say(f"nvdimm: {s.backing} ({s.size >> 20} MiB region"
             f"{', existing content kept' if s.backing.exists() else ', new'})")
    state_dir = runtime.state_dir(name)
    vm = VM.from_image(img, name, state_dir, daemonize=True, accel=args.accel, nvdimms=specs)
    try:
        vm.start()
        _say(f"[{time.monotonic() - t0:5.1f}s] QEMU pid {vm.pid} running ({vm.accel}), "
             f"ssh on 127.0.0.1:{vm.ssh_port}; waiting for the guest...")
        boot = vm.wait_for_ssh(args.timeout)
        _say(f"[{time.monotonic() - t0:5.1f}s] guest ssh-ready {boot:.1f} s after launch")
        nv_state = []
        for i, (spec, (_, mode)) in enumerate(zip(specs, nvdimms, strict=True)):
            region = f"region{i}"
            existing = [ns for ns in namespaces(vm, region) if "uuid" in ns]
            entry = {"backing": str(spec.backing), "size": spec.size, "region": region}
            if mode and not existing:
                entry["device"] = create_namespace(vm, mode, region)
                _say(f"nvdimm{i}: {mode} namespace {entry['device']}")
            nv_state.append(entry)
        if args.attach == "btt8":
            _say(f"[{time.monotonic() - t0:5.1f}s] {_attach_btt8(vm)}")
        assert vm.pid is not None and vm.ssh_port is not None and vm.accel is not None
        runtime.save(runtime.GuestState(
            name=name, pid=vm.pid, ssh_port=vm.ssh_port, accel=vm.accel,
            state_dir=str(state_dir), qmp_socket=str(vm.paths.qmp_socket),
            console_log=str(vm.paths.console_log), client_key=str(img.client_key),
            known_hosts=str(img.known_hosts), image=str(img.dir), started_at=time.time(),
            boot_seconds=round(boot, 2), nvdimms=nv_state, argv=vm.argv,
        ))
        vm.detach()
    except BaseException:
        vm.cleanup()
        raise
    _say(f"guest {name} is up. testbed ssh {name}   |   testbed down {name}")
    return 0


def _attach_btt8(vm: VM) -> str:
    """`up --attach btt8`: deploy the guest packages, format region0's devdax namespace as a
    BTT8 pool unless it already is one (its data is kept), attach it as /dev/btt8a."""
    dax = [device_path(ns) for ns in namespaces(vm) if ns.get("mode") == "devdax"]
    if not dax:
        raise NdctlError("--attach btt8 needs a devdax namespace (--nvdimm SIZE:devdax, the "
                         "default for a new guest)")
    with tempfile.TemporaryDirectory(prefix="testbed-up-") as tmp:
        Agent(*stage(Path(tmp))).deploy(vm)
    if vm.execute(*BTT8CTL[:2], "python3", "-m", "btt8", "check", dax[0], timeout=300).rc:
        vm.succeed(*BTT8CTL, "format", dax[0], "--bsize", "4096", "--force", timeout=300)
    return vm.succeed(*BTT8CTL, "attach", dax[0], "--name", BTT8_BLK_NAME, timeout=300).strip()


def _ssh_argv(st: runtime.GuestState) -> list[str]:
    return plain_ssh_argv(st.ssh_port, Path(st.client_key), Path(st.known_hosts))


def _ssh(args: argparse.Namespace) -> int:
    if _bad_name(args.name):
        return 2
    st = runtime.load(args.name)
    if st is None or not runtime.qemu_pids(args.name):
        _say(f"testbed: no running guest {args.name} (testbed up --name {args.name})")
        return 2
    argv = _ssh_argv(st)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if cmd:
        argv += ["--", shlex.join(cmd)]
    _say("equivalent: " + shlex.join(argv))
    if shutil.which("ssh") is None:
        _say("testbed: the ssh client is missing (apt-get install openssh-client)")
        return 2
    return subprocess.call(argv)


def _status(args: argparse.Namespace) -> int:
    rows = []
    for name in runtime.names():
        st = runtime.load(name)
        pids = runtime.qemu_pids(name)
        row: dict[str, Any] = {"name": name, "running": bool(pids), "pids": pids}
        if st is not None:
            row.update(ssh_port=st.ssh_port, accel=st.accel, boot_seconds=st.boot_seconds,
                       uptime_s=round(time.time() - st.started_at), nvdimms=st.nvdimms,
                       console_log=st.console_log, qmp_socket=st.qmp_socket)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no guests")
    else:
        for r in rows:
            state = "running" if r["running"] else "stopped"
            extra = (f"ssh 127.0.0.1:{r['ssh_port']}  {r['accel']}  up {r['uptime_s']} s  "
                     f"nvdimms {len(r['nvdimms'])}") if "ssh_port" in r else "(no state)"
            print(f"{r['name']:<16} {state:<8} {extra}")
    return 0


def _down_one(name: str, force: bool) -> None:
    st = runtime.load(name)
    if st is not None and runtime.qemu_pids(name) and not force:
        # Graceful first: the guest syncs and unmounts; then the hard stops in kill_all.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(_ssh_argv(st) + ["-o", "ConnectTimeout=3", "--", "busybox poweroff"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
        end = time.monotonic() + 10
        while time.monotonic() < end and runtime.qemu_pids(name):
            time.sleep(0.1)
    killed = runtime.kill_all(name)
    runtime.remove_state_dir(name)
    _say(f"guest {name}: down" + (f" (killed {killed})" if killed else ""))


def _down(args: argparse.Namespace) -> int:
    if not args.all and args.name is None:
        _say("testbed down: give a guest name or --all")
        return 2
    if not args.all and _bad_name(args.name):
        return 2
    for name in runtime.names() if args.all else [args.name]:
        _down_one(name, args.force)
    return 0


# --- image ---


def _image(args: argparse.Namespace) -> int:
    if args.image_command == "build":
        img = image_mod.build(force=args.force)
        print(img.dir)
        return 0
    data = image_mod.info(image_mod.current())
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for k, v in data.items():
            print(f"{k:<15} {v['path'] + '  ' + str(v['bytes']) if isinstance(v, dict) else v}")
    return 0


# --- bench ---


def _explore(args: argparse.Namespace) -> int:
    from testbed import explore

    try:
        if args.replay:
            code, verdict, repro = explore.replay(Path(args.replay))
            said = "reproduces" if code else "does not reproduce"
            print(f"{args.replay}: {repro.get('kind')} on LBA {repro.get('lba')} {said} "
                  f"(schedule of {len(repro['schedule'])} steps, crash state of "
                  f"{len(repro['crash_state'])} dirty lines)")
            print(json.dumps(verdict.to_json(), indent=1))
            return code
        cap = args.max_interleavings
        if cap is None and not args.exhaustive:
            cap = 200
        code, out = explore.run(
            Path(args.results), pool_mib=args.pool_mib, bsize=args.bsize, threads=args.threads,
            ops=args.ops, lbas=args.lbas, seed=args.seed, preemptions=args.preemptions,
            max_interleavings=cap, exhaustive=args.exhaustive)
    except Exception as e:  # the tool failed (or was given a bad file), not the code under test
        print(f"testbed explore: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print((out / "summary.json").read_text(), end="")
    return code


def _bench(args: argparse.Namespace) -> int:
    img = image_mod.build()
    launch_to_ssh, total = [], []
    with tempfile.TemporaryDirectory(prefix="testbed-bench-") as tmp:
        spec = NvdimmSpec(Path(tmp) / "nvdimm0.img", 256 << 20)
        for i in range(args.runs):
            t0 = time.monotonic()
            with VM.from_image(img, f"bench{i}", Path(tmp) / f"run{i}", accel=args.accel,
                               nvdimms=[spec]) as vm:
                vm.start()
                boot = vm.wait_for_ssh(120)
                vm.succeed("true")
                t1 = time.monotonic() - t0
                vm.crash("quit")
            launch_to_ssh.append(boot)
            total.append(t1)
            _say(f"run {i + 1}/{args.runs}: ssh-ready {boot:.2f} s after QEMU launch, "
                 f"{t1:.2f} s incl. overlay/accel/QMP setup ({vm.accel})")
    summary = {
        "runs": args.runs, "accel": vm.accel,
        "launch_to_ssh_s": {"min": round(min(launch_to_ssh), 2),
                            "median": round(statistics.median(launch_to_ssh), 2),
                            "max": round(max(launch_to_ssh), 2)},
        "total_s_median": round(statistics.median(total), 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="boot a guest and leave it running")
    p.add_argument("--name", default="default")
    p.add_argument("--nvdimm", action="append", type=_parse_nvdimm, default=[],
                   metavar="SIZE[:MODE]",
                   help=f"add an NVDIMM (region size, multiple of 16M); MODE one of "
                        f"{', '.join(MODES)} creates a namespace on first use "
                        f"(default: one 256M:devdax)")
    p.add_argument("--no-nvdimm", action="store_true", help="a guest without any NVDIMM")
    p.add_argument("--attach", choices=("btt8",),
                   help="btt8: format the devdax namespace as a BTT8 pool (unless it is one) "
                        "and attach it as /dev/btt8a")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to ssh-ready")
    p.set_defaults(func=_up)


def _add_ssh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ssh", help="shell or command in a running guest")
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")
    p.set_defaults(func=_ssh)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="guests started by testbed up")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _add_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop a guest (idempotent; NVDIMM backing files are kept)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.add_argument("--force", action="store_true", help="no guest poweroff, just stop QEMU")
    p.set_defaults(func=_down)


def _add_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="the guest image (cached by recipe hash)")
    isub = p.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="build unless cached")
    b.add_argument("--force", action="store_true")
    i = isub.add_parser("info", help="what the current recipe's image is")
    i.add_argument("--json", action="store_true")
    p.set_defaults(func=_image)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="model-check BTT8's steps against ADR crash states "
                       "(host only, no VM)")
    for flag, default, what in (
            ("--pool-mib", 16, "pool size in MiB"), ("--bsize", 512, "block size in bytes"),
            ("--threads", 2, "threads interleaved"), ("--ops", 3, "operations per thread"),
            ("--lbas", 1, "LBAs the operations spread over")):
        p.add_argument(flag, type=_positive_int, default=default, help=f"{what} ({default})")
    for flag, default, what in (
            ("--seed", 0, "seed of the op sequences and of the schedules past the bound"),
            ("--preemptions", 2, "context switches at a step where the running thread could "
                                 "go on")):
        p.add_argument(flag, type=_non_negative_int, default=default, help=f"{what} ({default})")
    p.add_argument("--max-interleavings", type=_positive_int, default=None,
                   help="schedules to run (default 200; no cap with --exhaustive)")
    p.add_argument("--exhaustive", action="store_true",
                   help="every schedule within --preemptions and every crash state, no random "
                   "tail; summary.json says whether the enumeration was complete")
    p.add_argument("--replay", metavar="VIOLATION_JSON",
                   help="re-run one violation-N.json reproduction; exit 1 if it reproduces")
    p.add_argument("--results", default="results", help="where run folders go (results)")
    p.set_defaults(func=_explore)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("boot", help="seconds from QEMU launch to ssh-ready")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.set_defaults(func=_bench)


# --- run / report / replay ---


def _run(args: argparse.Namespace) -> int:
    try:
        if args.resume is not None:
            if args.shard is not None or args.results is not None:
                _say("testbed run --resume: the run folder fixes the shard and where results "
                     "go (no --shard, --results)")
                return 2
            return campaign.resume(args.resume, args.scenario, jobs=args.jobs)
        if args.scenario is None:
            _say("testbed run: give a SCENARIO (or --resume RUN_DIR)")
            return 2
        return campaign.run(args.scenario, args.results or "results", shard=args.shard,
                            jobs=args.jobs)
    except (ScenarioError, ResumeError) as e:
        _say(f"testbed: {e}")
        return 2


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, not {text!r}")
    return int(text)


def _parse_shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _merge(paths: list[str]) -> int:
    if len(paths) < 2:
        _say("testbed report merge: give OUT and at least one shard run folder")
        return 2
    out, runs = Path(paths[0]), [Path(p) for p in paths[1:]]
    for run in runs:
        if not (run / "summary.json").is_file() or not (run / "scenario.yaml").is_file():
            _say(f"testbed: {run} is not a run folder (no summary.json or scenario.yaml)")
            return 2
    if out.exists():
        _say(f"testbed: {out} exists; merge writes a new folder")
        return 2
    try:
        merged = merge(out, runs)
    except (MergeError, ValueError) as e:
        _say(f"testbed: {e}")
        return 2
    publish(out)
    summary = merged.summary()
    _say(f"{summary['status']}: {summary['cuts']}/{summary['cuts_planned']} cuts from "
         f"{len(runs)} folders -> {out / 'report.html'}")
    return int(summary["exit_code"])


def _report(args: argparse.Namespace) -> int:
    if args.run_dir == "merge":
        return _merge(args.merge_args)
    if args.merge_args:
        _say("testbed report: one RUN_DIR (or: testbed report merge OUT RUN_DIR...)")
        return 2
    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file():
        _say(f"testbed: {run_dir} is not a run folder (no summary.json)")
        return 2
    if _is_explore_run(run_dir):
        try:
            print(render_explore_report(run_dir))
            write_explore_junit(run_dir)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            _say(f"testbed: {run_dir}/summary.json: not an explore summary: {e}")
            return 2
        return 0
    problems = publish(run_dir)
    print(run_dir / "report.html")
    if problems:
        more = f" (+{len(problems) - 1} more, listed in report.html)" if len(problems) > 1 else ""
        _say(f"testbed: {run_dir} is damaged: {problems[0]}{more}")
        return 2
    return 0


def _is_explore_run(run_dir: Path) -> bool:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False  # publish() reports the damage
    return isinstance(summary, dict) and summary.get("kind") == "explore"


def _replay(args: argparse.Namespace) -> int:
    return replay(Path(args.cut_dir), args.accel)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a power-cut campaign (exit 0 clean, 1 violations, "
                                   "2 testbed failure)")
    p.add_argument("scenario", nargs="?",
                   help="scenario YAML file, e.g. scenarios/powercut.yaml (with --resume: "
                        "optional, and must be the run's own)")
    p.add_argument("--results", default=None, help="where run folders go (default: results)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with an interrupted run from each chain's last finished cut, "
                        "in its folder, with its scenario, shard and --jobs")
    p.add_argument("--shard", type=_parse_shard, metavar="I/N",
                   help="run only cuts I, I+N, I+2N, ... (merge shards with testbed report merge)")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="N chains of cuts at once, each on its own guest (default: what the "
                        "machine's cores and memory fit)")
    p.set_defaults(func=_run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="re-render report.html and junit.xml of a run folder",
                       description="testbed report RUN_DIR: re-render a run folder's report.html "
                                   "and junit.xml.  testbed report merge OUT RUN_DIR...: merge "
                                   "shard folders (testbed run --shard) into one run folder OUT.")
    p.add_argument("run_dir", help="RUN_DIR, or `merge`")
    p.add_argument("merge_args", nargs="*", metavar="OUT RUN_DIR...", help=argparse.SUPPRESS)
    p.set_defaults(func=_report)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="boot a guest on a cut's crash image and open a shell")
    p.add_argument("cut_dir", help="RUN_DIR/cut-N (needs its crash image)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.set_defaults(func=_replay)


def _exec(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    names, cmd = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest \
        else ([], rest)
    if args.all:
        names = runtime.names()
    if not names or not cmd:
        _say("testbed exec: give guest names or --all, then -- CMD...")
        return 2
    worst = 0
    for name, result in fleet.run_on(names, cmd, timeout=args.timeout).items():
        if isinstance(result, Exception):
            _say(f"[{name}] {type(result).__name__}: {result}")
            worst = 2
            continue
        for line in result.stdout.splitlines():
            print(f"[{name}] {line}")
        for line in result.stderr.splitlines():
            _say(f"[{name}] {line}")
        if result.exited != 0:
            _say(f"[{name}] exit status {result.exited}")
            worst = 2
    return worst


def _add_exec(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exec", help="run one command on several running guests at once",
                       description="testbed exec NAME... -- CMD...  |  testbed exec --all -- "
                                   "CMD...: each output line prefixed with [NAME]; exit 2 if "
                                   "any guest failed or the command failed on any guest.")
    p.add_argument("--all", action="store_true", help="every running guest")
    p.add_argument("--timeout", type=float, default=None, help="seconds per guest")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="NAME... -- CMD...")
    p.set_defaults(func=_exec)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run, _add_report, _add_replay,
    _add_up, _add_ssh, _add_exec, _add_status, _add_down, _add_image, _add_bench,
]


def _configure_logging(verbose: bool) -> None:
    """-v: every phase, QMP command and SSH command, timestamped, on stderr."""
    for old in [h for h in log.handlers if getattr(h, "testbed_cli", False)]:
        log.removeHandler(old)  # main() may run more than once in a process (tests, scripts)
    handler = logging.StreamHandler(sys.stderr)
    handler.testbed_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(name)s: %(message)s",
                                           "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success; 1 violations found (`run` only); 2 anything that went wrong.
    `ssh NAME -- CMD` passes the guest command's own status through, like ssh."""
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every phase, QMP and SSH command (and tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _say("testbed: interrupted")
        return 2
    except (VMError, SSHError, fleet.FleetError, image_mod.ImageError, NvdimmError, NdctlError,
            OSError) as e:
        _say(f"testbed: {e}")
        log.debug("traceback", exc_info=True)
        return 2
    except Exception as e:
        _say(f"testbed: {args.command} failed: {type(e).__name__}: {e}"
             + ("" if args.verbose else " (-v for the traceback)"))
        log.debug("traceback", exc_info=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
