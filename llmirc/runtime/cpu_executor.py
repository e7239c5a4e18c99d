"""Runs a bundle's compiled CPU library: one `llmir_forward` call per step (DESIGN.md, the ABI).

Picks the library that fits this host (native first, then the portable baseline), maps the
weights, owns the KV pool and the workspace. No math happens here: NumPy only allocates and
passes pointers.

Buffer sizes come from the library itself (`llmir_model_info`), not from manifest.json: the
manifest is checksummed by nothing but itself, and a wrong size there would let compiled code
write out of bounds. The manifest must agree with the library, and every weight passed must
have the size the library was compiled for.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import struct
from pathlib import Path

import numpy as np

from llmirc import dtypes
from llmirc.artifact_format.reader import Bundle
from llmirc.errors import BundleError, LlmircError, RuntimeLimitError

from .step_check import INPUTS, StepLimits, checked_decode_run, checked_inputs

ABI_VERSION = 2
MAX_THREADS = 256  # runtime.c's: a larger count runs this many


# Linux arm64's AT_HWCAP and AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h) under their
# /proc/cpuinfo names
_ARM64_HWCAPS = {"fp": 0, "asimd": 1, "aes": 3, "pmull": 4, "sha1": 5, "sha2": 6, "crc32": 7, "atomics": 8,
                 "fphp": 9, "asimdhp": 10, "asimdrdm": 12, "asimddp": 20, "sve": 22}
_ARM64_HWCAPS2 = {"sve2": 1, "i8mm": 13, "bf16": 14}


def host_cpu_flags() -> set[str]:
    """The CPU features of this host as /proc/cpuinfo names them. On aarch64 Linux they come from
    the kernel's AT_HWCAP (getauxval), which also tells the truth under an emulator whose
    /proc/cpuinfo is the host's (qemu-user); elsewhere from /proc/cpuinfo's flags line."""
    if platform.machine() == "aarch64":
        try:
            libc = ctypes.CDLL(None)
            libc.getauxval.restype = ctypes.c_ulong
            hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
        except (OSError, AttributeError):
            hwcap = hwcap2 = 0
        if hwcap:
            return {name for name, bit in _ARM64_HWCAPS.items() if hwcap >> bit & 1} | \
                {name for name, bit in _ARM64_HWCAPS2.items() if hwcap2 >> bit & 1}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def pick_cpu_target(bundle: Bundle, name: str | None = None) -> dict:
    """The named CPU target, or of those that fit this host the one needing the most CPU features
    (native before baseline, aarch64-dotprod before aarch64-generic; the first in the manifest of
    equals)."""
    arch, flags = platform.machine(), host_cpu_flags()
    reasons, fits = [], []
    targets = bundle.manifest.get("targets")
    for t in targets if isinstance(targets, list) else []:
        if not isinstance(t, dict) or t.get("kind") != "cpu" or (name and t.get("name") != name):
            continue
        features = t.get("features") if isinstance(t.get("features"), list) else []
        if not all(isinstance(f, str) for f in features):  # (a CPU feature is a name: 1 or [] is damage)
            reasons.append(f"{t.get('name')} lists CPU features that are not names: {features!r:.60}")
            continue
        missing = sorted(set(features) - flags) if flags else []
        if t.get("arch") != arch:
            reasons.append(f"{t.get('name')} is for {t.get('arch')}")
        elif missing:
            reasons.append(f"{t.get('name')} needs {', '.join(missing[:6])}")
        elif not isinstance(t.get("library"), str):
            reasons.append(f"{t.get('name')} names no library")
        else:
            fits.append((len(features), t))
    if fits:
        return max(fits, key=lambda f: f[0])[1]  # max keeps the first of equals
    why = "; ".join(reasons) or (f"it has no cpu target named {name}" if name else "it has no cpu target")
    raise BundleError(f"bundle {bundle.name}: no target fits this {arch} host ({why})")


def elf_problem(path: Path) -> str | None:
    """Why the shared library at `path` cannot be mapped whole, or None: not a 64-bit ELF shared
    object, or its program headers or a loadable segment end past the file's end (a truncated
    file). The dynamic loader maps segments without checking them against the file's size, and
    reading a page past the end is a SIGBUS. Layout: the ELF-64 object file format (e_type at
    byte 16, e_phoff at 32, e_phentsize and e_phnum at 54; a program header is p_type, p_flags,
    p_offset, p_vaddr, p_paddr, p_filesz, ...). Raises OSError when the file cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] not in (1, 2):
            return "not a 64-bit ELF shared library"
        order = "<" if head[5] == 1 else ">"
        if struct.unpack_from(order + "H", head, 16)[0] != 3:  # e_type ET_DYN
            return "not a shared library (an ELF file of another type: an object file, an executable?)"
        (phoff,) = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        if phentsize < 56 or phoff + phnum * phentsize > size:
            return f"its program headers end past its {size} bytes (a truncated file?)"
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(order + "IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
            return f"its loadable segment {i} ends at byte {p_offset + p_filesz}, past its {size} bytes (a truncated " \
                   "file?)"
    return None


def _noexec_hint(path: Path) -> str:
    """Why a library may not map where the file system forbids running code (CI runners often mount
    /tmp noexec; dlopen then says only "failed to map segment from shared object")."""
    try:
        noexec = bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        return ""
    return " (its file system is mounted noexec, which forbids mapping code: put the bundle on another one)" \
        if noexec else ""


class CpuExecutor:
    kind = "cpu"

    def __init__(self, bundle: Bundle, num_blocks: int, target: str | None = None, threads: int | None = None):
        m, name = bundle.manifest, bundle.name
        self.target = pick_cpu_target(bundle, target)
        library = self.target["library"]
        path = bundle.file(library)
        try:
            if problem := elf_problem(path):
                raise OSError(problem)
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise BundleError(f"bundle {name}: cannot load {library}: {e}{_noexec_hint(path)}") from None
        try:
            abi_version, self._forward, info = self.lib.llmir_abi_version, self.lib.llmir_forward, \
                self.lib.llmir_model_info
        except AttributeError as e:
            raise BundleError(f"bundle {name}: {library} is not an llmir kernel library: {e}") from None
        abi_version.restype = ctypes.c_int64
        if abi_version() != ABI_VERSION:
            raise BundleError(f"bundle {name}: {library} has kernel ABI {abi_version()}; this loader runs "
                              f"ABI {ABI_VERSION}")
        info.restype = ctypes.c_char_p
        self.info = json.loads(info())
        self._forward.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
        self._forward.restype = None
        # multi-step greedy decode (runtime.c); libraries built before it lack it: one step at a time
        self._greedy = getattr(self.lib, "llmir_greedy_decode", None)
        if self._greedy is not None:
            self._greedy.restype = ctypes.c_int64
            self._greedy.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        if threads is not None and threads < 1:
            raise LlmircError(f"threads must be >= 1, got {threads}")
        # The count is the library's global, and a process maps a library once: two executors of the same
        # bundle share it, so each sets its own before every call (0: the CPUs this process may use).
        # Capped here too: 2**32 + 1 would wrap to 1 in the C int.
        self._set_threads = functools.partial(self.lib.llmir_set_num_threads,
                                              ctypes.c_int(min(threads or 0, MAX_THREADS)))
        self._set_threads()
        self.lib.llmir_num_threads.restype = ctypes.c_int
        self.threads = self.lib.llmir_num_threads()
        # whether prefill-sized matmuls run on AMX tiles: the library's kernels use them (its info;
        # libraries built before it say nothing) and the OS grants the tile state (runtime.c asks
        # once; LLMIR_AMX=0 in the environment turns them off)
        self.amx = self.info.get("amx") is True and bool(self.lib.llmir_amx_ready())

        pool = self.info["kv_pool"]
        self.block_size, self.kv_dtype = pool["block_size"], dtypes.dtype(pool["dtype"])
        self.vocab_size = self.info["logits_cols"]
        self.workspace_coef = self.info["workspace"]
        for key in ("num_layers", "num_kv_heads", "block_size", "head_dim", "dtype"):
            _agree(name, m, ("kv_cache", key), pool[key])
        _agree(name, m, ("model", "vocab_size"), self.vocab_size)
        _agree(name, m, ("abi", "workspace"), self.workspace_coef)
        self.limits = StepLimits.from_info(self.info, num_blocks, self.block_size, name)
        _agree(name, m, ("model", "max_position_embeddings"), self.limits.max_context)
        # A full-sequence library must get whole sequences each step: the library says so, not the manifest.
        self.full_sequence = bool(self.info.get("full_sequence", False))
        if bool((m.get("model") or {}).get("full_sequence", False)) != self.full_sequence:
            raise BundleError(f"bundle {name}: manifest.json model.full_sequence disagrees with the compiled "
                              f"library ({self.full_sequence})")
        self.weights = _load_weights(bundle, self.info["weights"])

        self.num_blocks = num_blocks
        # [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] of the pool's dtype (an int8 pool
        # then has its scales): the library's block_bytes per block
        try:
            self.kv_pool = np.zeros(num_blocks * int(pool["block_bytes"]), dtype=np.uint8)
        except (MemoryError, ValueError):  # numpy raises ValueError for sizes it cannot even represent
            raise RuntimeLimitError(f"bundle {name}: cannot allocate a KV cache of "
                                    f"{num_blocks * pool['block_bytes'] / 2**30:.1f} GiB; give it fewer tokens "
                                    "(--kv-cache-tokens, load(kv_cache_tokens=...))") from None
        self.workspace = np.empty(0, dtype=np.uint8)
        first_weight = len(INPUTS) + 3
        self._ptrs = (ctypes.c_void_p * (first_weight + len(self.weights)))()
        for i, w in enumerate(self.weights):
            self._ptrs[first_weight + i] = w.ctypes.data
        self._ptrs[len(INPUTS)] = self.kv_pool.ctypes.data
        self._dims = (ctypes.c_int64 * 5)()

    def close(self) -> None:
        """Drops the KV cache and the weights' file mapping (the executor is unusable afterwards;
        the library stays mapped: a process cannot unload it safely)."""
        self.kv_pool = self.workspace = self._ptrs = None
        self.weights = []

    def forward(self, token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                logits_indices) -> np.ndarray:
        """Logits [len(logits_indices), vocab] for one step; K/V of the step's tokens land in the pool.

        Every index is checked against the library's limits first (step_check.py): RuntimeLimitError."""
        inputs = checked_inputs(self.limits, token_ids, positions, slot_mapping, block_tables, seq_lens,
                                query_start_loc, logits_indices)
        logits = self._bind(inputs)
        self._forward(self._dims, self._ptrs)
        return logits

    @property
    def supports_greedy_runs(self) -> bool:
        return self._greedy is not None

    def forward_greedy(self, inputs, steps: int) -> np.ndarray:
        """Tokens [steps, B] of `steps` greedy decode steps in one native call (runtime.c's
        llmir_greedy_decode): `inputs` (the seven ABI inputs) is a step of B sequences with one token
        each; step i + 1 feeds step i's argmax tokens at the next positions, whose slots the block
        tables must already hold. The first and the last step's inputs are checked like forward's
        (the steps between lie between them): RuntimeLimitError. Fewer rows come back when a token
        falls outside the embedding table (the next step's check reports it)."""
        first = [a.copy() for a in checked_decode_run(self.limits, inputs, steps)]  # advanced in place
        B = len(first[4])
        logits = self._bind(first)  # every step writes it: this name keeps it alive through the call
        out = np.empty((steps, B), dtype=np.int32)
        done = self._greedy(ctypes.cast(self._forward, ctypes.c_void_p), self._dims, self._ptrs, steps,
                            self.vocab_size, self.limits.token_rows, self.block_size, out.ctypes.data)
        del logits  # (alive until here)
        return out[:done]

    def _bind(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Point the call's arguments at the checked inputs, the workspace and a new logits array (and
        the library's thread count at this executor's)."""
        self._set_threads()
        T, B, L = len(inputs[0]), len(inputs[4]), len(inputs[6])
        max_blocks = inputs[3].shape[1] if inputs[3].ndim == 2 else 0
        c = self.workspace_coef
        need = c["T"] * T + c["L"] * L + c["const"] + c.get("TT", 0) * T * T  # TT: full-sequence models
        if self.workspace.size < need:
            # 64-byte aligned: slot offsets are multiples of 64 (plan.ALIGN)
            raw = np.empty(need + 64, dtype=np.uint8)
            start = -raw.ctypes.data % 64
            self.workspace = raw[start:start + need]
        logits = np.empty((L, self.vocab_size), dtype=np.float32)
        for i, a in enumerate(inputs):
            self._ptrs[i] = a.ctypes.data
        self._ptrs[len(INPUTS) + 1] = self.workspace.ctypes.data
        self._ptrs[len(INPUTS) + 2] = logits.ctypes.data
        self._dims[:] = [T, B, L, max_blocks, self.num_blocks]
        return logits


def _agree(bundle: str, manifest: dict, path: tuple[str, str], value) -> None:
    section = manifest.get(path[0])
    got = section.get(path[1]) if isinstance(section, dict) else None
    if got != value:
        raise BundleError(f"bundle {bundle}: manifest.json {'.'.join(path)} is {got!r} but the compiled "
                          f"library was built for {value}")


def _load_weights(bundle: Bundle, expected: list) -> list[np.ndarray]:
    """The weights in the manifest's order (zero-copy views of the mapped file), each checked
    against the dtype and shape the library was compiled for."""
    weights = bundle.manifest.get("weights")
    order = weights.get("order") if isinstance(weights, dict) else None
    file = weights.get("file") if isinstance(weights, dict) else None
    if not isinstance(order, list) or not isinstance(file, str) or len(order) != len(expected) or \
            len(set(map(str, order))) != len(order):
        raise BundleError(f"bundle {bundle.name}: manifest.json weights.order must list the {len(expected)} "
                          "distinct tensors the library takes, and weights.file their file")
    tensors = bundle.open_safetensors(file)
    arrays = []
    for name, (dtype, shape) in zip(order, expected):
        if not isinstance(name, str) or name not in tensors:
            raise BundleError(f"bundle {bundle.name}: manifest.json weights.order names {name!r}, which is not "
                              f"in {file}")
        stored, stored_shape = tensors.info(name)
        if dtypes.dtype(stored).name != dtype or list(stored_shape) != list(shape):
            raise BundleError(f"bundle {bundle.name}: weight '{name}' is {dtypes.dtype(stored).name}"
                              f"{list(stored_shape)}; the library expects {dtype}{list(shape)}")
        arrays.append(tensors.array(name))
    return arrays
