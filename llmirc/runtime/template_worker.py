"""Chat templates render in a child process: the hard bound on a bundle's template code.

jinja's sandbox, bounded further in jinja_sandbox.py, keeps a template from Python's internals
and stops the common ways to spend time and memory, but not every one (a recursive macro
doubling its work at each level, `lipsum(10**6)`, a list of a million strings sorted, ...). So
`render` sends the template's source and variables, as JSON, to a child Python process that
renders them (`chat_template.render_here`) within MAX_MEMORY bytes of address space beyond what
it had started with (RLIMIT_AS, never above the user's `ulimit -v`), and is killed past TIMEOUT
seconds (by its parent, and by its own SIGALRM a second later should the parent be gone); the
next rendering starts a new child. Variables arrive as JSON gives them back: tuples as lists,
dict keys as strings. Renderings take turns (one child per process, behind a lock). The child
ignores SIGINT (Ctrl-C is its parent's to handle) and exits when its standard input closes, so with its
parent. Messages both ways: a 4-byte big-endian length, then UTF-8 JSON: {} once started, then
{"source", "variables"} -> {"text"} or {"error", "restart"}.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmirc.errors import LlmircError

MAX_MEMORY = 1 << 30  # bytes of address space a rendering may add
TIMEOUT = 5.0  # seconds a rendering may take
STARTUP = 60.0  # seconds the child may take to start (a loaded machine)

_lock = threading.Lock()
_child: subprocess.Popen | None = None


def _forget_the_parents_child() -> None:
    """After os.fork: the pipes to the parent's child are the parent's (this process starts its own)."""
    global _lock, _child
    _lock, _child = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_the_parents_child)


def render(source: str, variables: dict) -> str:
    """The text of jinja `source` rendered with `variables` (JSON values), in the child. Raises
    LlmircError with the failure (the template's error, a limit of the sandbox, the time or the
    memory; the caller names the template), or for variables that are not JSON values."""
    try:
        request = json.dumps({"source": source, "variables": variables}).encode()  # (ASCII: lone surrogates too)
    except (TypeError, ValueError) as e:
        raise LlmircError(f"template variables must be JSON values (text, numbers, lists, objects): {e}") from None
    with _lock:
        global _child
        try:
            if _child is None or _child.poll() is not None:
                _child = _start()
            _child.stdin.write(struct.pack(">I", len(request)) + request)
            _child.stdin.flush()
            reply = json.loads(_receive(_child.stdout.fileno(), time.monotonic() + TIMEOUT))
        except TimeoutError:
            _stop()
            raise LlmircError(f"rendering took more than {TIMEOUT:g} s, so it was stopped") from None
        except (OSError, EOFError, ValueError):
            _stop()
            raise LlmircError("rendering failed: the renderer process ended") from None
        except BaseException:  # Ctrl-C while it rendered: its reply would answer the next request
            _stop()
            raise
        if reply.get("restart"):
            _stop()
    if "error" in reply:
        raise LlmircError(reply["error"])
    return reply["text"]


def _start() -> subprocess.Popen:
    """A new child, once it says it is ready (imported, limited); LlmircError if it does not."""
    child = subprocess.Popen([sys.executable, "-m", "llmirc.runtime.template_worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_environment())
    try:
        _receive(child.stdout.fileno(), time.monotonic() + STARTUP)
    except (TimeoutError, OSError, EOFError, ValueError):
        child.kill()
        child.wait()
        raise LlmircError(f"the renderer process did not start within {STARTUP:g} s") from None
    return child


def _child_environment() -> dict:
    """This process's environment, with the folder llmirc is imported from first on the child's
    path (also when it runs from a source tree), and not the working folder (PYTHONSAFEPATH)."""
    import llmirc

    root = str(Path(llmirc.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}


def _stop() -> None:
    global _child
    if _child is not None:
        _child.kill()
        _child.wait()
    _child = None


def stop() -> None:
    """Ends the child, if any (a rendering waiting on it fails at once); the next starts another."""
    if _child is not None:
        _child.kill()


def _receive(fd: int, deadline: float) -> bytes:
    """One message from `fd` (its length first), by `deadline` (time.monotonic) or TimeoutError."""
    def read(n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)
    return read(struct.unpack(">I", read(4))[0])


def main() -> None:
    """The child: renders requests from standard input until it closes."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from llmirc.runtime.chat_template import render_here

    with open("/proc/self/statm") as f:  # address space now (pages), imports done
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    # (never above a limit the user set: `ulimit -v`)
    limit = min([used + MAX_MEMORY] + [n for n in resource.getrlimit(resource.RLIMIT_AS)
                                       if n != resource.RLIM_INFINITY])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(struct.pack(">I", 2) + b"{}")
    stdout.flush()
    while len(header := stdin.read(4)) == 4:
        request = json.loads(stdin.read(struct.unpack(">I", header)[0]))
        signal.setitimer(signal.ITIMER_REAL, TIMEOUT + 1)  # SIGALRM ends it, should its parent be gone
        try:
            reply = {"text": render_here(request["source"], request["variables"])}
        except LlmircError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"rendering failed: it needed more than {MAX_MEMORY >> 20} MiB", "restart": True}
        signal.setitimer(signal.ITIMER_REAL, 0)
        data = json.dumps(reply).encode()
        stdout.write(struct.pack(">I", len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    main()
