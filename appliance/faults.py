"""Fault injection for resume tests: RFM_FAULT_KILL_AT="<point>:<n>" SIGKILLs this process
the n-th time `checkpoint(point)` is reached (a real kill: no cleanup, no atexit)."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def checkpoint(point: str) -> None:
    spec = os.environ.get("RFM_FAULT_KILL_AT")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)
