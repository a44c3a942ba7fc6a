"""nbdkit's Python plugin serving one BTT8 pool (btt8ctl attach starts it; not imported by btt8).

    nbdkit --unix SOCK --pidfile PID python .../btt8/nbdkit_plugin.py pool=DEV bsize=N

The pool is opened (BTT8 recovery) in config_complete, before nbdkit forks into the background,
so a pool that cannot be opened makes nbdkit exit with the error instead of serving; the
verbs are nbdexport.Export's. PYTHONPATH must reach the btt8 package (btt8ctl sets it).
"""

from __future__ import annotations

import errno
from typing import Any

import nbdkit  # provided by nbdkit's python plugin, only inside nbdkit

import btt8
from btt8.nbdexport import Export

API_VERSION = 2

_params: dict[str, str] = {}
_export: Export | None = None


def config(key: str, value: str) -> None:
    if key not in ("pool", "bsize"):
        raise ValueError(f"unknown parameter {key!r} (expected pool=PATH bsize=N)")
    _params[key] = value


def config_complete() -> None:
    global _export
    if "pool" not in _params:
        raise ValueError("pool=PATH is required")
    _export = Export(btt8.open(_params["pool"], int(_params.get("bsize", "0"))))


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def unload() -> None:
    if _export is not None:
        _export.close()


def _ex() -> Export:
    assert _export is not None
    return _export


def _call(fn: Any, *args: Any) -> None:
    """Run one verb; an OSError's errno goes back to the NBD client (EIO otherwise)."""
    try:
        fn(*args)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def open(readonly: bool) -> int:  # noqa: A001 (nbdkit's callback name)
    return 1


def get_size(h: int) -> int:
    return _ex().size


def block_size(h: int) -> tuple[int, int, int]:
    bs = _ex().bsize
    return bs, bs, 32 << 20  # minimum, preferred, maximum request


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fast_zero(h: int) -> bool:
    return True  # set_zero is a map update, never a data write


def can_fua(h: int) -> int:
    return int(nbdkit.FUA_NATIVE)  # every write is durable when it returns


def can_multi_conn(h: int) -> bool:
    return True  # one pool behind every connection; a flush on any covers all (a no-op)


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    _call(_ex().pread, buf, offset)


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    _call(_ex().pwrite, buf, offset)


def flush(h: int, flags: int) -> None:
    _ex().flush()


def trim(h: int, count: int, offset: int, flags: int) -> None:
    _call(_ex().trim, count, offset)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    _call(_ex().zero, count, offset)
