import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Triton kernels run on Triton's interpreter in the tests (CI has no GPU). It must be chosen before
# any kernel is decorated; AOT compilation runs in worker processes that turn it off.
os.environ.setdefault("TRITON_INTERPRET", "1")
