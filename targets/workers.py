"""Process pools for compiling kernels (the CPU objects, the Triton kernels) in parallel.

Workers are spawned (no forked copy of a process that may hold threads and locks) and end with
the process that made them: on Linux each asks for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), so a compile killed with SIGKILL, or by the out-of-memory killer,
leaves no workers behind holding its pipes open. Ctrl-C, SIGTERM and SIGHUP are the parent's
alone: a terminal, or `timeout`, signals the whole process group, and a worker, or the ptxas a
Triton compile runs, dying first made the parent's clean-up race its own signal (a half-written
bundle left behind; Triton's reproducer of the "failed" ptxas on stdout). So each worker ignores
them and leads a process group of its own, which the tools it runs inherit; multiprocessing's
resource tracker ignores SIGINT and SIGTERM itself and is started here with SIGHUP ignored (it
died on a hang-up and printed tracebacks).
When the parent's work ends with an exception, a signal's included, its workers are killed with
their process groups (a ptxas a worker runs too), not waited for. (A Ctrl-C landing in a wait for
a worker could hang the exit for good.) At most one worker per usable CPU. Native code runs only in
workers, even for one task: when it crashes (an assertion in llvmlite's LLVM, which is built with
them, aborted a compile) the worker dies, not the compile, which reports it (run_tasks:
WorkerDied) and cleans up as for any error.
A tool the parent runs itself (the C linker) leads a process group too, killed whole on a stop;
`held_signals` keeps a stop from landing between the tool's start and its pid being known.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context, resource_tracker

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def held_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP that arrive inside the block take effect as it ends (their handlers
    run then, raising there): for a few lines that must not stop half done, as starting a process
    whose pid the caller needs to kill it. Outside the main thread (where handlers cannot be set)
    it holds nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in STOPS}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # (None: a handler not set from Python, which cannot be put back)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in arrived:
            signal.raise_signal(signum)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(jobs: int | None, tasks: int) -> int:
    """Workers for `tasks` tasks: `jobs` (default: the usable CPUs), at most one per usable CPU and
    per task, at least 1."""
    usable = usable_cpus()
    return max(1, min(jobs or usable, usable, tasks))


@contextmanager
def worker_pool(workers: int, initializer: Callable[[], None] | None = None) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` spawned processes that die with this one, for a `with` block;
    `initializer` (a module-level function) runs first in each. The block's end waits for the
    work; an exception out of the block (KeyboardInterrupt, a signal's, a task's error) kills
    the workers first."""
    _start_resource_tracker()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start,
                               initargs=(os.getpid(), initializer))
    try:
        yield pool
    except BaseException:
        _kill(pool)
        raise
    pool.shutdown()


class WorkerDied(RuntimeError):
    """A worker process died (a crash in native code it ran: an LLVM assertion, a segmentation
    fault) with tasks unfinished; the crash's own message, if any, went to stderr."""


def run_tasks(pool: ProcessPoolExecutor, tasks: dict, done: Callable | None = None,
              name: Callable = str) -> dict:
    """Runs `tasks`, {key: (function, *args)} (module-level functions, picklable arguments), on
    `pool`; returns {key: result}, calling done(key, result) as each finishes. A task's exception
    propagates; a worker that dies raises WorkerDied naming (`name(key)`) the tasks left."""
    futures = {pool.submit(fn, *args): key for key, (fn, *args) in tasks.items()}
    results = {}
    try:
        for future in as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            if done is not None:
                done(key, results[key])
    except BrokenProcessPool:
        left = [name(key) for key in tasks if key not in results]
        raise WorkerDied(f"a compile process crashed (in native code; its message, if any, is above) on one of "
                         f"{len(left)} unfinished: {', '.join(left[:6])}{', ...' if len(left) > 6 else ''}") from None
    return results


def _kill(pool: ProcessPoolExecutor) -> None:
    """Kills the pool's workers; the pool's manager thread then fails the work left and reaps
    them. Not here: a wait (Process.join) that a second Ctrl-C interrupts between waitpid and
    recording the exit leaves that thread waiting for good for a process that no longer exists;
    cancelling futures races with the thread failing them (an InvalidStateError traceback), so
    callers wait on futures with `result()`, not `Executor.map`, which cancels them when stopped."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # (3.14: pool.kill_workers())
        # the worker's process group: the tool it runs (Triton's ptxas) too, which else ran on, writing into the
        # compile's scratch folder as it was removed (an internal error: 'Directory not empty'; a file left there)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:  # no such group (a worker that has not made its own yet)
            process.kill()
    # A worker killed while it wrote a result leaves part of it in the result pipe, and the
    # manager thread would wait for the rest for good, and the exit with it (it joins that thread:
    # a SIGTERM to a compile's process group hung it, ignoring further signals, in CI). This
    # process's copy of the pipe's write end is the last one once the workers are dead: closed,
    # the read ends (EOF) and the thread fails the pool as broken.
    queue = getattr(pool, "_result_queue", None)
    if queue is not None:
        queue._writer.close()
    pool.shutdown(wait=False)


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker (spawned pools' semaphores), started while this thread
    blocks SIGHUP: the tracker then survives a hang-up (tests/test_cli_errors.py), and one that
    arrives meanwhile waits here. (Ignoring SIGHUP for that moment lost such a hang-up: the compile
    went on and finished.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start(parent: int, initializer: Callable[[], None] | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    os.setpgid(0, 0)  # a group of its own: what it runs (ptxas, which handles these signals itself) too
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # it died before the request took effect
            os._exit(1)
    if initializer is not None:
        initializer()
