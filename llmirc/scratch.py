"""Scratch folders of a compile in the temporary directory (TMPDIR), and their removal once the
process that made them has died.

A folder is named `llmirc-KIND-HOST-PID-RANDOM` (KIND: calibration, link, gguf), so that a later
compile on this host can tell one left by a killed process (SIGKILL, the out-of-memory killer, a CI
timeout: nothing of ours runs then) from one a running compile still uses. SIGINT, SIGTERM and
SIGHUP clean up as the `with` blocks unwind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from llmirc.artifact_format.writer import host_tag, process_alive
from llmirc.targets.workers import held_signals

PREFIX = "llmirc-"


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A new private folder (mode 0700) in TMPDIR for this process; `cleanup()` or `with` removes it, and
    so does the interpreter's exit where neither ran (the object's finalizer)."""
    with held_signals():  # (a stop between mkdtemp's mkdir and the finalizer's making left the folder behind)
        return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{kind}-{host_tag()}-{os.getpid()}-")


def remove_stale() -> list[str]:
    """Removes the scratch folders in TMPDIR that processes of this host left when they were
    killed, and returns their names; those of running processes, other hosts and other users
    are left alone."""
    pattern = re.compile(re.escape(PREFIX) + r"[a-z]+-" + re.escape(host_tag()) + r"-(\d+)-\w+")
    removed = []
    for p in sorted(Path(tempfile.gettempdir()).glob(PREFIX + "*")):
        m = pattern.fullmatch(p.name)
        try:
            if m and p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid() \
                    and not process_alive(int(m[1])):
                shutil.rmtree(p, ignore_errors=True)
                if not os.path.lexists(p):
                    removed.append(p.name)
        except OSError:  # gone meanwhile
            continue
    return removed
