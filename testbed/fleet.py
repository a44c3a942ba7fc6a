"""Guests started by `testbed up`, reached from Python or the shell through fabric.

    import testbed
    c = testbed.connect("default")        # a fabric Connection, the guest's host key pinned
    print(c.run("ndctl list", hide=True).stdout)

    testbed exec a b -- ndctl list        # the same command on several guests at once
"""

from __future__ import annotations

import shlex
from pathlib import Path

import fabric
import paramiko

from testbed import runtime
from testbed.ssh import HostKeyMismatch, connection


class FleetError(Exception):
    """No such running guest, or it cannot be reached."""


def connect(name: str = "default", timeout: float = 10.0) -> fabric.Connection:
    """An open fabric Connection to the running guest `name` (testbed up --name NAME); a guest
    presenting another host key than the one pinned for its image is refused."""
    runtime.check_name(name)
    state = runtime.load(name)
    if state is None or not runtime.qemu_pids(name):
        raise FleetError(f"no running guest {name} (testbed up --name {name})")
    conn = connection(state.ssh_port, Path(state.client_key), Path(state.known_hosts),
                      timeout=timeout)
    try:
        conn.open()
    except paramiko.BadHostKeyException as e:
        conn.close()
        raise HostKeyMismatch(f"guest {name} presented a host key that does not match the "
                              f"pinned one in {state.known_hosts}: refused") from e
    except (OSError, paramiko.SSHException, EOFError) as e:
        conn.close()
        raise FleetError(f"guest {name}: ssh failed: {e}") from e
    return conn


def run_on(names: list[str], argv: list[str],
           timeout: float | None = None) -> dict[str, fabric.Result | Exception]:
    """Run argv (quoted with shlex.join) on every guest at once (a fabric ThreadingGroup);
    per guest its Result (whatever the exit status) or the exception that stopped it."""
    conns = {name: connect(name) for name in names}
    group = fabric.ThreadingGroup.from_connections(list(conns.values()))
    try:
        results = group.run(shlex.join(argv), hide=True, warn=True,
                            timeout=timeout)
    except fabric.exceptions.GroupException as e:
        results = e.result
    finally:
        group.close()
    by_conn = dict(results.items())
    return {name: by_conn[conn] for name, conn in conns.items()}
