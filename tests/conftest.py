import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# llmirc's cache (llmirc/cache.py: compiled CPU kernels, Triton kernels, bundle verifications) is
# one folder for the whole run, out of the user's: made by the xdist controller (or the only
# process), inherited by the workers and every subprocess, removed at the end.
os.environ.pop("LLMIRC_CACHE_DIR", None)

# An xdist worker computes with one BLAS / OpenMP thread (numpy's OpenBLAS, torch): two workers of two
# threads each on CI's 2 cores stall each other's spinning threads (the calibration, autoround and smooth
# tests took 70 s instead of 78-86 s on 2 workers). Set before numpy or torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="llmirc-test-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
    # Where bytecode is not written (PYTHONDONTWRITEBYTECODE), each of the suite's Python processes (the
    # CLI's subprocesses: ~590 in test_cli_errors alone; the compiles' spawned workers, servers) compiled
    # llmirc's and its dependencies' sources again: ~0.13 s of CPU for a CLI compile that fails early. The
    # run's processes write it into a folder of their own (not the sources' or site-packages' __pycache__),
    # removed at the end.
    if sys.flags.dont_write_bytecode and not os.environ.get("PYTHONPYCACHEPREFIX"):
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="llmirc-test-pycache-")
        atexit.register(shutil.rmtree, os.environ["PYTHONPYCACHEPREFIX"], True)
        sys.pycache_prefix, sys.dont_write_bytecode = os.environ["PYTHONPYCACHEPREFIX"], False

# Triton kernels run on Triton's interpreter in the tests (CI has no GPU). It must be chosen before
# any kernel is decorated; AOT compilation runs in worker processes that turn it off.
os.environ.setdefault("TRITON_INTERPRET", "1")
