"""Process pools for compiling kernels (the CPU objects, the Triton kernels) in parallel.

Workers are spawned (no forked copy of a process that may hold threads and locks) and end with
the process that made them: on Linux each asks for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), so a compile killed with SIGKILL, or by the out-of-memory killer,
leaves no workers behind holding its pipes open. At most one worker per usable CPU.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(jobs: int | None, tasks: int) -> int:
    """Workers for `tasks` tasks: `jobs` (default: the usable CPUs), at most one per usable CPU and
    per task, at least 1."""
    usable = usable_cpus()
    return max(1, min(jobs or usable, usable, tasks))


def worker_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that die with this one; `initializer` (a module-level
    function) runs first in each."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start,
                               initargs=(os.getpid(), initializer))


def _start(parent: int, initializer: Callable[[], None] | None) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # it died before the request took effect
            os._exit(1)
    if initializer is not None:
        initializer()
