import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Bundle verifications are remembered under $XDG_CACHE_HOME/llmirc: keep the tests' records out of
# the user's cache (subprocesses inherit this).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="llmirc-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# Triton kernels run on Triton's interpreter in the tests (CI has no GPU). It must be chosen before
# any kernel is decorated; AOT compilation runs in worker processes that turn it off.
os.environ.setdefault("TRITON_INTERPRET", "1")
