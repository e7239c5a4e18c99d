"""Where llmirc keeps what it can make again: compiled kernels and the record of verified bundles.

The root is `$LLMIRC_CACHE_DIR` if set, else `$XDG_CACHE_HOME/llmirc`, else `~/.cache/llmirc`
(an XDG_CACHE_HOME that is not an absolute path is ignored, as the XDG Base Directory
specification says: it would be a folder of whatever the current directory is).
Everything under it only saves work: any of it may be deleted at any time. Standard library
only (the loader imports it).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(part: str) -> Path:
    """The cache folder for `part` (`cpu`, `triton`, `verified`); not created here."""
    root = os.environ.get("LLMIRC_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = os.path.join(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"), "llmirc")
    return Path(root) / part
