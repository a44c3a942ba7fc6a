"""Clients: what drives a block-device target during a cut round, and how its round is judged.

`target.client` in a scenario picks one (kernel-btt, raw-pmem, btt8-blk; default `agent`):

- `agent`: the agent's per-LBA register workload (O_DIRECT on the device), judged by
  testbed.oracle (torn, phantom, lost-ack, read-reverted, ...).
- `fio`: fio writes the region once in random order with crc32c verify headers; before the cut
  the host touches fio's trigger file, fio saves its verify state and the agent sends it over
  the event channel; after recovery the same job replays as `--verify_only
  --verify_state_load`: every write fio completed must verify. Violation `fio-verify`.
- `ext4`: mkfs.ext4 once; per op create/write/fsync/rename/fsync-dir or unlink (each fsync'd
  file's sha256 in its events); after the cut a mount replays the journal, `e2fsck -fn` must be
  clean (`fsck`), the filesystem must mount (`unmountable`) and every file whose rename was
  acknowledged must hold one of the contents it may have (`fsync-lost`).

The campaign loop calls, per round: `workload` (the agent's, with the client in its target),
`before_cut(machine, epoch)`, `recover_config()` (extra recover-and-dump config),
`judge(config, events, recovery, initial)`. The guest side is guest/tbagent/clients.py.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from testbed import events as events_mod
from testbed import oracle

if TYPE_CHECKING:
    from testbed.restart import Machine

FIO_TRIGGER = "/run/tbagent-fio/trigger"  # tbagent.clients.FIO_TRIGGER
FIO_STATE_TIMEOUT_S = 120.0


class ClientError(Exception):
    """The client's machinery failed (no verify state came back): a testbed failure."""


class Client:
    name: ClassVar[str]

    def before_cut(self, machine: Machine, epoch: int) -> None:
        """Right before the power is cut (the trigger has fired)."""

    def recover_config(self) -> dict[str, Any]:
        """Extra keys of recover-and-dump's config."""
        return {}

    def judge(self, config: dict[str, Any], events: list[dict[str, Any]],
              recovery: dict[str, Any], initial: dict[int, oracle.Decoded]) -> oracle.Verdict:
        raise NotImplementedError


class AgentClient(Client):
    name = "agent"

    def judge(self, config: dict[str, Any], events: list[dict[str, Any]],
              recovery: dict[str, Any], initial: dict[int, oracle.Decoded]) -> oracle.Verdict:
        return oracle.judge(config, events, recovery, initial, unseen_ops=0)


class FioClient(Client):
    name = "fio"

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.job: dict[str, Any] = {}
        self.complete = False

    def before_cut(self, machine: Machine, epoch: int) -> None:
        """Fire fio's trigger and wait until its verify state is on the host."""
        machine.vm.execute("touch", FIO_TRIGGER, timeout=30)
        deadline = time.monotonic() + FIO_STATE_TIMEOUT_S
        while time.monotonic() < deadline:
            for ev in events_mod.read(machine.events):
                if ev.get("ev") == "fio-state" and ev.get("epoch") == epoch:
                    self.state, self.job = dict(ev.get("files") or {}), dict(ev.get("job") or {})
                    self.complete = bool(ev.get("complete"))
                    return
            time.sleep(0.02)
        raise ClientError(f"fio sent no verify state within {FIO_STATE_TIMEOUT_S:g} s of its "
                          f"trigger (round {epoch})")

    def recover_config(self) -> dict[str, Any]:
        return {"fio_state": self.state, "fio_job": self.job, "fio_complete": self.complete}

    def judge(self, config: dict[str, Any], events: list[dict[str, Any]],
              recovery: dict[str, Any], initial: dict[int, oracle.Decoded]) -> oracle.Verdict:
        verdict = _base_verdict(config, events, recovery, per_thread=False)
        v = recovery.get("verify") if recovery.get("ok") else None
        if v is not None:
            verdict.stats = {"acked_writes": int(v.get("verified_ios", 0)),
                             "verify_state_files": len(v.get("state_files", []))}
            if v.get("rc") or v.get("error") or v.get("bad"):
                verdict.violations.append(oracle.Violation(
                    "fio-verify", None,
                    f"fio verify of the completed writes failed (rc {v.get('rc')}, error "
                    f"{v.get('error')}, {v.get('bad')} bad-block lines):\n{v.get('output', '')}"))
        return verdict


class Ext4Client(Client):
    """Keeps, across rounds, what each load file may hold: (acceptable sha256s, may be absent),
    pinned to what each recovery found (like the oracle's initial values)."""

    name = "ext4"

    def __init__(self) -> None:
        self.files: dict[str, tuple[frozenset[str], bool]] = {}

    def judge(self, config: dict[str, Any], events: list[dict[str, Any]],
              recovery: dict[str, Any], initial: dict[int, oracle.Decoded]) -> oracle.Verdict:
        verdict = _base_verdict(config, events, recovery)
        expect = dict(self.files)
        acked = 0
        for e in events:
            if e.get("epoch") != config["epoch"] or "path" not in e:
                continue
            path, ev, kind = e["path"], e.get("ev"), e.get("kind")
            digests, absent_ok = expect.get(path, (frozenset(), True))
            if kind == "write" and ev == "invoke":
                expect[path] = (digests | {e["sha256"]}, absent_ok)
            elif kind == "write" and ev == "ok":
                expect[path] = (frozenset({e["sha256"]}), False)
                acked += 1
            elif kind == "unlink" and ev == "invoke":
                expect[path] = (digests, True)
        verdict.stats = {"acked_writes": acked, "files_expected": sum(
            1 for _, absent_ok in expect.values() if not absent_ok)}
        if not recovery.get("ok"):
            return verdict
        if recovery.get("mount_error"):
            verdict.violations.append(oracle.Violation(
                "unmountable", None, f"ext4 did not mount after the cut: "
                                     f"{recovery['mount_error']}"))
        fsck = recovery.get("fsck") or {}
        if fsck.get("rc"):
            verdict.violations.append(oracle.Violation(
                "fsck", None, f"e2fsck -fn exit {fsck.get('rc')} after the journal replay:\n"
                              f"{fsck.get('output', '')}"))
        found: dict[str, str] = recovery.get("files") or {}
        if not recovery.get("mount_error"):
            for path, (digests, absent_ok) in sorted(expect.items()):
                got = found.get(path)
                if got is None and not absent_ok:
                    verdict.violations.append(oracle.Violation(
                        "fsync-lost", None, f"{path}: fsync'd and renamed (acknowledged), "
                                            f"missing after the cut"))
                elif got is not None and digests and got not in digests:
                    verdict.violations.append(oracle.Violation(
                        "fsync-lost", None, f"{path}: content sha256 {got[:16]} is none of "
                                            f"the {len(digests)} it may hold"))
        self.files = {path: (frozenset({d}), False) for path, d in found.items()}
        return verdict


def _base_verdict(config: dict[str, Any], events: list[dict[str, Any]],
                  recovery: dict[str, Any], per_thread: bool = True) -> oracle.Verdict:
    """worker-died (threads of the ext4 load; for fio, fio ending with an error before the
    cut) and unrecoverable (the target could not be attached or opened after the cut)."""
    epoch = config["epoch"]
    verdict = oracle.Verdict(epoch)
    round_events = [e for e in events if e.get("epoch") == epoch]
    if per_thread:
        verdict.violations.extend(oracle.worker_deaths(config["threads"], round_events))
    else:
        verdict.violations.extend(
            oracle.Violation("worker-died", None, f"fio failed before the cut: {error}")
            for e in round_events if e.get("ev") == "done" for error in e.get("errors") or [])
    if not recovery.get("ok"):
        verdict.violations.append(oracle.Violation(
            "unrecoverable", None, str(recovery.get("error", "recover-and-dump failed"))))
    return verdict


CLIENTS: dict[str, type[Client]] = {c.name: c for c in (AgentClient, FioClient, Ext4Client)}


def make_client(name: str | None) -> Client:
    return CLIENTS[name or "agent"]()
