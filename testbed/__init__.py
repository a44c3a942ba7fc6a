"""testbed: QEMU-backed power-cut testbed for persistent-memory block software."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fabric

__version__ = "0.1.0"


def connect(name: str = "default") -> fabric.Connection:
    """An open fabric Connection to a guest started by `testbed up --name NAME`, its host key
    pinned (testbed.fleet)."""
    from testbed.fleet import connect as connect_guest

    return connect_guest(name)
