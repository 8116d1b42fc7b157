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
import subprocess
import sys
import time
from typing import Iterable

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
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


# -- a guard for descendants that are not direct children ---------------------------------------

GUARD_INTERVAL_S = 0.2
"""How often the guard looks at the tree (a scan of /proc: about 1 ms per 60 processes)."""
_guard: "subprocess.Popen[bytes] | None" = None


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":  # a zombie has exited already
            table[int(entry)] = (int(fields[1]), fields[19].decode())
    return table


def _descendants(roots: Iterable[int], table: dict[int, tuple[int, str]]) -> set[tuple[int, str]]:
    """(pid, start time) of every descendant of ``roots`` in ``table``, in one walk."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[tuple[int, str]] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, table[child][1]))
            stack.append(child)
    return found


def guard_descendants(owner: int) -> None:
    """Watch ``owner``'s process tree and, once ``owner`` is gone, SIGKILL every process that was
    in it. The body of the process :func:`start_descendant_guard` starts."""
    me = os.getpid()
    seen: set[tuple[int, str]] = set()
    ready = False
    while True:
        table = _process_table()
        if owner not in table or os.getppid() != owner:
            break
        seen |= {d for d in _descendants([owner], table) if d[0] != me}
        if not ready:  # the owner waits for the first look before it starts what is guarded
            print("ready", flush=True)
            ready = True
        time.sleep(GUARD_INTERVAL_S)
    for _ in range(3):  # what the tree spawned while it was being killed goes too
        table = _process_table()
        alive = {(pid, start) for pid, start in seen if table.get(pid, (0, None))[1] == start}
        alive = {d for d in alive | _descendants([pid for pid, _ in alive], table) if d[0] != me}
        if not alive:
            return
        for pid, _ in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        seen |= alive
        time.sleep(GUARD_INTERVAL_S)


def start_descendant_guard() -> subprocess.Popen[bytes] | None:
    """Start a guard process that kills this process's whole tree once this process dies, however
    it dies. For trees whose grandchildren do not die with their parents: a local Ray's agents
    outlive a SIGKILLed driver by about a minute. Linux only (None elsewhere).

    This process becomes a child subreaper, so a descendant orphaned while it lives (its parent
    exited) stays in its tree, where the guard sees it, instead of moving to init. Returns once
    the guard has looked at the tree."""
    if _LIBC is None or not os.path.isdir("/proc"):
        return None
    _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    guard = subprocess.Popen([sys.executable, "-c", f"from harness.lifetime import guard_descendants; "
                              f"guard_descendants({os.getpid()})"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    assert guard.stdout is not None
    guard.stdout.readline()  # "ready" (or nothing, if the guard could not start)
    return guard


def ensure_descendant_guard() -> None:
    """:func:`start_descendant_guard`, once per process."""
    global _guard
    if _guard is None or _guard.poll() is not None:
        _guard = start_descendant_guard()
