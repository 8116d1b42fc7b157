"""Child processes that end with the process that started them.

A run killed outright (``kill -9``, an OOM kill) cannot clean up: without this, its pool workers
and the METEOR JVM live on, holding cores and memory, for seconds or until their next read. On
Linux a child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere
this is a no-op and children end when their pipes close.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# loaded here, not in the child: as a preexec_fn this runs between fork and exec, where only
# async-signal-safe work belongs (no library lookup, no import)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In a child: be killed when the parent dies (call it first thing, e.g. as ``preexec_fn``
    or a pool initializer). The parent may already be gone, then exit now."""
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
