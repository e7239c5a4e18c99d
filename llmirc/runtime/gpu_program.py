"""The host side of a GPU target, with no driver: a bundle's kernel calls as launches, packed arguments
and the device memory plan. `gpu_executor.py` runs what this computes.

A GPU target entry of the manifest (targets/triton/target.py) holds, per plan kernel symbol, the
launch rule of its kind (llmirc.runtime.launch_rules), per compiled kernel its binary and launch
metadata, and the workspace layout (`slots`: each workspace slot's dtype and byte offset as
coefficients of T, L, TT and const). One forward is the manifest's plan (`plan`: the calls in
order, arguments by name; the target's own `plan` where it has one: the GPU-only fusions of
targets/triton/fuse.py) with every argument resolved:

    pointer {"ptr": space, "index": i, "col": c}: the base address of the buffer (an ABI input,
            the KV pool, a workspace slot, the logits, a weight) + c elements of its dtype
    {"dim": name}: T, B, L, max_blocks or num_blocks of the step
    int / float: a constant of the call

then the rule's variant for the call's integers picks the launches; each launch's kernel takes
its arguments by name (the call's, its computed scalars, the rule's buffers) and two trailing
NULL pointers (Triton's global and profile scratch, unused by our kernels: checked at compile
time, and here). Arguments are packed as the binary's parameter list says: pointers and i64 as
8 bytes, i32 and fp32 as 4 (`pack`). A cuda kernel whose metadata says `launch_pdl` is launched
with programmatic dependent launch (targets/triton/pdl.py).

Buffers a rule asks for (`splitk_workspace`, `attn_workspace`) are allocated once at the
largest dims the executor runs: zero-initialized ones (split-K tile counters) one per kernel
symbol, as their layouts differ; the others (scratch) one per name, shared by all calls.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

from llmirc import dtypes
from llmirc.errors import BundleError, LlmircError

from . import launch_rules
from .step_check import INPUTS

ALIGN = 256  # device allocations: cuMemAlloc / hipMalloc return at least 256-byte aligned addresses
SPACES = ("input", "pool", "ws", "logits", "weight", "null")
DIMS = ("T", "B", "L", "max_blocks", "num_blocks")
CTYPES = {"i64": ctypes.c_int64, "i32": ctypes.c_int32, "fp32": ctypes.c_float}
HIDDEN = ("global_scratch", "profile_scratch")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the compiled kernel (its key in the target's binaries), the grid, the
    argument values in the binary's parameter order (ints; floats for fp32) and the plan kernel
    symbol (or sampling kind) it is a launch of."""

    kernel: str
    grid: tuple[int, int, int]
    values: tuple
    symbol: str = ""


class GpuUnavailable(LlmircError):
    """This host cannot run a GPU target; the message says why in one line (no driver, no kernels
    for the device, too little memory)."""


def check_target(bundle, target: dict) -> None:
    """What a GPU executor checks of a target entry when it opens it, without a driver (`inspect
    --load` on a host without that GPU): its launch rules against its binaries' parameters
    (GpuProgram) and every binary and PTX file listed in the bundle. BundleError otherwise."""
    program = GpuProgram(bundle.manifest, target, bundle.name)
    for b in program.binaries.values():
        for key in ("binary", "ptx"):
            if key in b:
                bundle.file(b[key])


def waits_for_pdl(target: dict, binary: dict) -> bool:
    """Whether a binary's kernel waits for the kernel before it (targets/triton/pdl.py: constexpr
    PDL "wait", a cuda target for sm_90 or newer), so that launching it with programmatic
    dependent launch is safe."""
    arch = str(target.get("arch", ""))
    return target.get("kind") == "cuda" and arch[3:].isdigit() and int(arch[3:]) >= 90 and \
        isinstance(binary.get("constexprs"), dict) and binary["constexprs"].get("PDL") == "wait"


def align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class GpuProgram:
    """The launches of one GPU target of a bundle. Raises BundleError for a malformed entry."""

    def __init__(self, manifest: dict, target: dict, bundle: str = "bundle"):
        self.name, self.target = bundle, target
        try:
            self.binaries: dict = target["binaries"]
            self.rules = {k["symbol"]: k["rule"] for k in target["kernels"]}
            self.sampling = dict(target["sampling"])
            self.slots = [(dtypes.dtype(s["dtype"]), {k: int(v) for k, v in s["offset"].items()})
                          for s in target["slots"]]
            self.steps = [(s["kernel"], s["args"]) for s in target.get("plan", manifest["plan"])]
            weights = manifest["weights"]
            self.weight_dtypes = [dtypes.dtype(weights["dtypes"][n]) for n in weights["order"]]
            self.pool_dtype = dtypes.dtype(manifest["kv_cache"]["dtype"])
            self.workspace = {k: int(v) for k, v in manifest["abi"]["workspace"].items()}
            for symbol, _ in self.steps:
                if symbol not in self.rules:
                    raise BundleError(f"bundle {bundle}: the plan calls {symbol!r}, which target "
                                      f"{target.get('name')!r} does not compile")
            if any(not isinstance(args, dict) for _, args in self.steps):
                raise BundleError(f"bundle {bundle}: a plan call's arguments are not a mapping")
            # each argument checked once here and kept resolved to (space, index, byte offset): a
            # forward only adds addresses (it runs per prefill step, 150 calls for a 16-layer model)
            self.calls = [(symbol, {name: self._arg(a) for name, a in args.items()}) for symbol, args in self.steps]
            for rule in [*self.rules.values(), *self.sampling.values()]:
                for v in rule["variants"]:
                    for ln in v["launches"]:
                        self._check_launch(rule, ln)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # (a rule or launch entry too)
            raise BundleError(f"bundle {bundle}: GPU target {target.get('name')!r} is malformed ({e!r:.80})") from None

    def _check_launch(self, rule: dict, ln: dict) -> None:
        b = self.binaries.get(ln["kernel"])
        if not isinstance(b, dict):
            raise BundleError(f"bundle {self.name}: kernel {ln['kernel']!r} has no binary in {self.target['name']}")
        types = dict(map(tuple, rule["args"])) | {s: "i64" for s in ln.get("scalars", {})}
        want = [[a, types.get(a)] for a in ln["args"]] + [[h, "*i8"] for h in HIDDEN]
        if b.get("params") != want or b.get("global_scratch_size") or b.get("profile_scratch_size") or \
                b.get("num_ctas") != 1 or b.get("launch_cooperative_grid"):
            raise BundleError(f"bundle {self.name}: kernel {b.get('kernel')!r} takes {b.get('params')}, its launch "
                              f"rule passes {want} (or it needs scratch, clusters or cooperative launch)")
        pdl = b.get("launch_pdl", False)
        if pdl is not False and (pdl is not True or not waits_for_pdl(self.target, b)):
            raise BundleError(f"bundle {self.name}: kernel {b.get('kernel')!r} asks for launch_pdl {pdl!r}, which "
                              "only a kernel of a cuda target for sm_90 or newer compiled to wait may (true)")

    # -- memory ----------------------------------------------------------------------------
    def workspace_bytes(self, T: int, L: int) -> int:
        c = self.workspace
        return c.get("T", 0) * T + c.get("L", 0) * L + c.get("TT", 0) * T * T + c.get("const", 0)

    def slot_offset(self, index: int, T: int, L: int) -> int:
        if not 0 <= index < len(self.slots):
            raise BundleError(f"bundle {self.name}: the plan names workspace slot {index} of {len(self.slots)}")
        c = self.slots[index][1]
        return c.get("T", 0) * T + c.get("L", 0) * L + c.get("TT", 0) * T * T + c.get("const", 0)

    def buffers(self, dims: dict) -> dict[tuple[str, str], tuple[int, bool]]:
        """{(owner, name): (bytes, zero_init)} the rules' buffers need at `dims` (the largest the
        executor runs): owner is the kernel symbol for zero-initialized buffers, '' otherwise."""
        out: dict = {}
        for symbol, rule in [*self.rules.items(), *self.sampling.items()]:
            env = {a: dims.get(a, 1) for a, t in rule["args"] if t == "i64"}
            sizes = launch_rules.buffer_bytes(rule, env)
            for buf in rule.get("buffers", []):
                key = (symbol, buf["name"]) if buf.get("zero_init") else ("", buf["name"])
                size = max(out.get(key, (0, False))[0], sizes[buf["name"]], 1)
                out[key] = (size, bool(buf.get("zero_init")))
        return out

    # -- launches --------------------------------------------------------------------------
    def forward(self, dims: dict, addr: dict) -> Iterator[Launch]:
        """The launches of one forward, in order, each computed as it is asked for (so a launcher
        starts the first while the rest are computed). `dims`: T, B, L, max_blocks, num_blocks;
        `addr`: device addresses of the inputs (by name), "pool", "ws", "logits", "weights" (a
        list, plan order) and "buffers" ({(owner, name): address}, see `buffers`)."""
        for symbol, args in self.calls:
            values = {name: self._value(a, dims, addr) for name, a in args.items()}
            yield from self.launches(symbol, self.rules[symbol], values, addr["buffers"])

    def launches(self, symbol: str, rule: dict, values: dict, buffers: dict) -> list[Launch]:
        """The launches of one call of `rule` with its argument values (ints, floats, addresses)."""
        for buf in rule.get("buffers", []):
            values[buf["name"]] = buffers[(symbol, buf["name"]) if buf.get("zero_init") else ("", buf["name"])]
        env = launch_rules.env_of(rule, values)
        out = []
        for ln in launch_rules.select(rule, env):
            grid = launch_rules.grid(ln, env)
            if 0 in grid:
                continue
            v = values | launch_rules.scalars(ln, env)
            launch_rules.check_aligned(ln, v)
            out.append(Launch(ln["kernel"], grid, tuple(v[a] for a in ln["args"]) + (0, 0), symbol))
        return out

    def _arg(self, a):
        """A plan argument checked and resolved: ("const", value), ("dim", name), ("null",) or
        (space, index, byte offset) for a pointer."""
        if isinstance(a, bool) or not isinstance(a, (int, float, dict)):
            raise BundleError(f"bundle {self.name}: malformed plan argument {a!r:.60}")
        if not isinstance(a, dict):
            return ("const", a)
        if "dim" in a:
            if a["dim"] not in DIMS:
                raise BundleError(f"bundle {self.name}: the plan names an unknown dim {a['dim']!r}")
            return ("dim", a["dim"])
        space, index, col = a.get("ptr"), a.get("index", 0), a.get("col", 0)
        if space not in SPACES or isinstance(col, bool) or not isinstance(col, int) or col < 0:
            raise BundleError(f"bundle {self.name}: malformed plan pointer {a!r:.80}")
        if space == "null":
            return ("null",)
        if space == "input":
            if index not in INPUTS:
                raise BundleError(f"bundle {self.name}: the plan names an unknown input {index!r}")
            return ("input", index, 4 * col)
        if space == "weight":
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.weight_dtypes):
                raise BundleError(f"bundle {self.name}: the plan names weight {index!r}")
            return ("weight", index, self.weight_dtypes[index].itemsize * col)
        if space == "ws":
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.slots):
                raise BundleError(f"bundle {self.name}: the plan names workspace slot {index!r} of {len(self.slots)}")
            return ("ws", index, self.slots[index][0].itemsize * col)
        if space == "pool":
            return ("pool", None, self.pool_dtype.itemsize * col)
        return ("logits", None, 4 * col)

    def _value(self, a: tuple, dims: dict, addr: dict):
        space = a[0]
        if space == "const":
            return a[1]
        if space == "dim":
            return int(dims[a[1]])
        if space == "null":
            return 0
        if space == "input":
            return addr[a[1]] + a[2]
        if space == "weight":
            return addr["weights"][a[1]] + a[2]
        if space == "ws":
            return addr["ws"] + self.slot_offset(a[1], dims["T"], dims["L"]) + a[2]
        return addr[space] + a[2]


def pack(binary: dict, values: tuple):
    """Kernel parameters for cuLaunchKernel / hipModuleLaunchKernel: (array of void* pointing at
    each value, the ctypes values it points into: keep both alive until the launch is done)."""
    params = binary["params"]
    if len(params) != len(values):
        raise BundleError(f"kernel {binary.get('kernel')!r} takes {len(params)} parameters, got {len(values)}")
    cells = []
    for (name, t), v in zip(params, values):
        if t.startswith("*"):
            cells.append(ctypes.c_uint64(int(v)))
        elif t in CTYPES:
            cells.append(CTYPES[t](v))
        else:
            raise BundleError(f"kernel {binary.get('kernel')!r}: parameter {name} has unknown type {t!r}")
    array = (ctypes.c_void_p * len(cells))(*(ctypes.addressof(c) for c in cells))
    return array, cells


def kv_cache_blocks(free: int, total: int, utilization: float, other: int, block_bytes: int, min_blocks: int,
                    device: str = "GPU") -> int:
    """KV cache blocks that fit: vLLM's rule, the pool gets what is left of `utilization` x the
    device's memory after what is already used (total - free: other processes, and this model's
    weights and buffers when they are allocated first) and `other` bytes still to come (graphs).
    GpuUnavailable when fewer than `min_blocks` (one sequence of the full context) fit."""
    if not 0 < utilization <= 1:
        raise LlmircError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(total * utilization) - (total - free) - other
    blocks = max(0, budget // block_bytes) if block_bytes else 0
    if blocks < min_blocks:
        raise GpuUnavailable(f"{device}: too little memory: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free; the model "
                          f"needs {other / 2**30:.2f} GiB and a KV cache of at least {min_blocks} blocks "
                          f"({min_blocks * block_bytes / 2**30:.2f} GiB) within gpu_memory_utilization {utilization}")
    return blocks
