"""Runs a bundle's compiled CPU library: one `llmir_forward` call per step (DESIGN.md, the ABI).

Picks the library that fits this host (native first, then the portable baseline), maps the
weights, owns the KV pool and the workspace. No math happens here: NumPy only allocates and
passes pointers.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np

from llmirc.artifact_format.reader import Bundle
from llmirc.errors import BundleError

ABI_VERSION = 1
INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
          "logits_indices")


def host_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def pick_cpu_target(bundle: Bundle) -> dict:
    """The first CPU target (manifest order: native first) whose arch and features this host has."""
    arch, flags = platform.machine(), host_cpu_flags()
    reasons = []
    for t in bundle.manifest.get("targets", []):
        if not isinstance(t, dict) or t.get("kind") != "cpu":
            continue
        missing = sorted(set(t.get("features", [])) - flags) if flags else []
        if t.get("arch") != arch:
            reasons.append(f"{t.get('name')} is for {t.get('arch')}")
        elif missing:
            reasons.append(f"{t.get('name')} needs {', '.join(missing[:6])}")
        else:
            return t
    why = "; ".join(reasons) or "it has no cpu target"
    raise BundleError(f"bundle {bundle.name}: no target fits this {arch} host ({why})")


class CpuExecutor:
    def __init__(self, bundle: Bundle, num_blocks: int):
        m = bundle.manifest
        self.target = pick_cpu_target(bundle)
        if self.target.get("abi_version") != ABI_VERSION:
            raise BundleError(f"bundle {bundle.name}: kernel ABI {self.target.get('abi_version')} is not "
                              f"supported by this loader (ABI {ABI_VERSION})")
        lib_path = bundle.file(self.target["library"])
        try:
            self.lib = ctypes.CDLL(str(lib_path))
        except OSError as e:
            raise BundleError(f"bundle {bundle.name}: cannot load {self.target['library']}: {e}") from None
        if self.lib.llmir_abi_version() != ABI_VERSION:
            raise BundleError(f"bundle {bundle.name}: {self.target['library']} has the wrong ABI version")
        self._forward = self.lib.llmir_forward
        self._forward.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
        self._forward.restype = None

        weights = bundle.open_safetensors(m["weights"]["file"])
        self.weights = [weights.array(name) for name in m["weights"]["order"]]
        for name, w in zip(m["weights"]["order"], self.weights):
            if w.dtype != np.float32 or not w.flags.c_contiguous:
                raise BundleError(f"bundle {bundle.name}: weight '{name}' is not contiguous float32")
        kv = m["kv_cache"]
        self.block_size = kv["block_size"]
        self.num_blocks = num_blocks
        self.kv_pool = np.zeros((kv["num_layers"], 2, num_blocks, kv["num_kv_heads"], self.block_size,
                                 kv["head_dim"]), dtype=np.float32)
        self.vocab_size = m["model"]["vocab_size"]
        self.workspace_coef = m["abi"]["workspace"]
        self.workspace = np.empty(0, dtype=np.float32)
        n = len(INPUTS) + 3 + len(self.weights)
        self._ptrs = (ctypes.c_void_p * n)()
        for i, w in enumerate(self.weights):
            self._ptrs[len(INPUTS) + 3 + i] = w.ctypes.data
        self._ptrs[len(INPUTS)] = self.kv_pool.ctypes.data
        self._dims = (ctypes.c_int64 * 5)()

    def forward(self, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                logits_indices) -> np.ndarray:
        """Logits [len(logits_indices), vocab] for one step; K/V of the step's tokens land in the pool."""
        inputs = [np.ascontiguousarray(a, dtype=np.int32) for a in
                  (token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices)]
        T, B, L = len(inputs[0]), len(inputs[4]), len(inputs[6])
        max_blocks = inputs[3].shape[1] if inputs[3].ndim == 2 else 0
        c = self.workspace_coef
        need = c["T"] * T + c["L"] * L + c.get("const", 0)
        if self.workspace.size < need:
            self.workspace = np.empty(need, dtype=np.float32)
        logits = np.empty((L, self.vocab_size), dtype=np.float32)
        for i, a in enumerate(inputs):
            self._ptrs[i] = a.ctypes.data
        self._ptrs[len(INPUTS) + 1] = self.workspace.ctypes.data
        self._ptrs[len(INPUTS) + 2] = logits.ctypes.data
        self._dims[:] = [T, B, L, max_blocks, self.num_blocks]
        self._forward(self._dims, self._ptrs)
        return logits
