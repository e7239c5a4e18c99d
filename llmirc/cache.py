"""Where llmirc keeps what it can make again: compiled kernels and the record of verified bundles.

The root is `$LLMIRC_CACHE_DIR` if set, else `$XDG_CACHE_HOME/llmirc`, else `~/.cache/llmirc`
(an XDG_CACHE_HOME that is not an absolute path is ignored, as the XDG Base Directory
specification says: it would be a folder of whatever the current directory is).
Everything under it only saves work: any of it may be deleted at any time. Standard library
only (the loader imports it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


NO_HOME = "no kernel cache (no home folder: set HOME, XDG_CACHE_HOME or LLMIRC_CACHE_DIR): nothing compiled now is kept"


def cache_dir(part: str) -> Path | None:
    """The cache folder for `part` (`cpu`, `triton`, `verified`); not created here. None when there is
    no home folder to put it in (HOME unset and a uid without a passwd entry, as in `docker run -u N`:
    expanduser leaves "~" as it is, and a folder named "~" appeared in the current directory)."""
    root = os.environ.get("LLMIRC_CACHE_DIR")
    if not root:
        xdg, home = os.environ.get("XDG_CACHE_HOME", ""), os.path.expanduser("~")
        if not os.path.isabs(xdg) and not os.path.isabs(home):
            return None
        root = os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home, ".cache"), "llmirc")
    return Path(root) / part


def store(path: Path, data: bytes) -> str | None:
    """Writes `data` to `path` atomically (a temporary file beside it, renamed into place); returns
    why it could not (None when it did). The temporary file goes whatever stops the write: a full
    disk, Ctrl-C or the CLI's SIGTERM (those are raised again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    except OSError as e:
        return e.strerror or str(e)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        return e.strerror or str(e)
    return None
