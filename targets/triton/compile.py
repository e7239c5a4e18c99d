"""Ahead-of-time compilation of Triton kernels on a machine without a GPU.

    results = compile_kernels([(spec, "sm_90") for spec in rule.kernels().values()], cache_dir=...)

Each KernelSpec and architecture goes through Triton's stages with an explicit GPUTarget (no
driver is touched): cuda ttir -> ttgir -> llir -> ptx -> cubin, hip ttir -> ttgir -> llir ->
amdgcn -> hsaco. A `Compiled` keeps every stage's text, the binary, compile time per stage
and the launch metadata a launcher outside Triton needs:

  symbol       the kernel's entry name in the binary (cuModuleGetFunction / hipModuleGetFunction)
  num_warps    block = num_warps * warp_size threads (x only)
  shared       dynamic shared memory bytes; above 48 KB a CUDA launcher must first set
               CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (refused here above the arch's
               opt-in limit)
  params       the binary's parameters in order: the run-time arguments (pointers and i64 as
               8 bytes, fp32 as 4) then two hidden pointers every Triton 3.9 kernel takes,
               `global_scratch` and `profile_scratch`. When global_scratch_size (resp.
               profile_scratch_size) is 0 the launcher passes NULL; otherwise a buffer of
               grid_x * grid_y * grid_z * num_ctas * size bytes aligned to *_align. Our
               kernels need neither (checked: 0 for all); launch_cooperative_grid is
               false and num_ctas is 1 (a launcher must refuse otherwise).
  launch_pdl   launch with programmatic dependent launch (CUDA's launch attribute
               PROGRAMMATIC_STREAM_SERIALIZATION): the kernels whose constexpr PDL is "wait"
               (pdl.py), only when CompileOptions.gpu_pdl asks for them.
  params are checked against the binary itself (the PTX .entry parameter list; the AMDGPU
  kernel descriptor's .args), so a Triton that changes its ABI fails here, not on a GPU.

Compilation runs in worker processes (spawned, with TRITON_INTERPRET unset: kernels are
decorated as compilable JITFunctions there even when this process runs the interpreter; and
without source line info, which named the compiling checkout's paths in the binaries),
`jobs` at a time. A disk cache keyed by the Triton version, the kernel's source (with its
callees', Triton's cache_key), constexprs, signature, options and architecture makes an
identical kernel compile once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmirc.cache import NO_HOME, cache_dir
from llmirc.errors import LlmircError
from llmirc.scratch import scratch_dir

from ..workers import run_tasks, worker_count, worker_pool
from .arch import get_arch
from .spec import KernelSpec

STAGES = {"cuda": ("ttir", "ttgir", "llir", "ptx", "cubin"), "hip": ("ttir", "ttgir", "llir", "amdgcn", "hsaco")}
BINARY = {"cuda": "cubin", "hip": "hsaco"}
HIDDEN_PARAMS = (("global_scratch", "*i8"), ("profile_scratch", "*i8"))
PARAM_BYTES = {"i64": 8, "i32": 4, "fp32": 4}  # pointers: 8


class CompileError(LlmircError):
    """A kernel does not compile for an architecture (or needs more than it offers)."""


@dataclass
class Compiled:
    key: str                       # cache key (content hash)
    arch: str
    kernel: str                    # the @triton.jit function's name
    binary: bytes                  # cubin / hsaco
    asm: dict = field(repr=False)  # stage -> text (ttir, ttgir, llir, ptx|amdgcn)
    metadata: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)  # stage -> seconds (empty on a cache hit)
    cached: bool = False
    unstored: str = ""             # why it could not be stored in the cache ("": it was, or came from it)


def default_cache_dir() -> Path | None:
    return cache_dir("triton")


def _request(spec: KernelSpec, arch: str) -> dict:
    """A picklable description of one compilation (the worker imports the function by name)."""
    fn = spec.fn
    raw = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction -> the Python function
    return {"module": raw.__module__, "name": raw.__name__, "signature": spec.signature(),
            "constexprs": dict(spec.constexprs), "aligned": sorted(spec.aligned), "args": [list(a) for a in spec.args],
            "num_warps": spec.num_warps, "num_stages": spec.num_stages, "arch": arch,
            **({"launch_pdl": True} if spec.launch_pdl else {})}


def compile_kernels(kernels, *, cache_dir: Path | None = None, jobs: int | None = None,
                    warn: Callable[[str], None] = lambda message: None) -> list[Compiled]:
    """Compiles (KernelSpec, arch name) pairs, in order, `jobs` processes at a time (default and
    most: the CPUs this process may use; targets/workers.py). A cache that cannot be written costs
    only the compilation (`warn` is told why), as the CPU objects' does. Raises CompileError."""
    requests = [_request(spec, get_arch(arch).name) for spec, arch in kernels]
    if not requests:
        return []
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()  # (None: no home folder to keep one in)
    keys = [json.dumps(r, sort_keys=True, default=repr) for r in requests]
    unique = dict(zip(keys, requests))
    # Triton's temporary files (ptxas' .ptx, .ptx.o and .log) in a scratch folder of this compile: a
    # worker killed as the compile stops cannot remove its own, and they were left in TMPDIR
    with scratch_dir("triton") as tmp, worker_pool(worker_count(jobs, len(unique)),
                                                   functools.partial(_worker_init, tmp)) as pool:
        if cache_dir is None:
            warn(NO_HOME)
            cache_dir = Path(tmp) / "cache"
        elif problem := _unwritable(cache_dir):  # (Triton's own cache too: it failed every kernel's compile)
            warn(f"the kernel cache {cache_dir} cannot be written ({problem}): nothing compiled now is kept")
            cache_dir = Path(tmp) / "cache"
        done = run_tasks(pool, {key: (_compile_one, request, str(cache_dir)) for key, request in unique.items()},
                         name=lambda key: f"{unique[key]['name']} for {unique[key]['arch']}")
    if problem := next((c.unstored for c in done.values() if c.unstored), ""):  # (a full disk)
        warn(f"the kernel cache {cache_dir} cannot be written ({problem}): some kernels compiled now are not kept")
    return [done[k] for k in keys]


def _unwritable(cache: Path) -> str | None:
    """Why a folder cannot be made and written at `cache` (None: it can)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _worker_init(tmp: str):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TMPDIR"], tempfile.tempdir = tmp, tmp  # (and the tools it runs)
    # no source line info in the binaries: it named this checkout's absolute paths, so a bundle's
    # bytes depended on which checkout first filled the kernel cache, and shipped them
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    os.dup2(2, 1)  # what Triton prints (a failed ptxas's reproducer) goes to stderr: stdout is `--emit`'s


def _compile_one(req: dict, cache_dir: str) -> Compiled:
    import importlib

    import triton
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(req["module"]), req["name"])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise CompileError(f"Triton kernel {req['name']} was decorated for the interpreter in the compile worker: "
                           "the main module sets TRITON_INTERPRET or imports kernels outside `if __name__ == "
                           "'__main__':`")
    arch = get_arch(req["arch"])
    options = {"num_warps": req["num_warps"], "num_stages": req["num_stages"], "enable_fp_fusion": True,
               **({"launch_pdl": True} if req.get("launch_pdl") else {})}
    key_text = json.dumps([triton.__version__, fn.cache_key, req, options, "no line info"], sort_keys=True,
                          default=repr)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    entry = Path(cache_dir) / arch.name / key
    if os.path.lexists(entry):
        if (hit := _load(entry, key, arch.name)) is not None:
            return hit
        shutil.rmtree(entry, ignore_errors=True)  # damaged (a truncated file): compiled again and stored anew

    order = list(fn.arg_names)
    attrs = {(order.index(a),): [["tt.divisibility", 16]] for a in req["aligned"]}
    src = ASTSource(fn=fn, signature=req["signature"], constexprs=req["constexprs"], attrs=attrs)

    def listener(*, src, metadata, metadata_group, times, cache_hit):  # times: triton.knobs.CompileTimes
        listener.times = {stage: us / 1e6 for stage, us in times.lowering_stages}

    # Triton's own cache, in the compile's scratch folder: what it would keep is in this one, and a full
    # disk under it failed the kernel's compile ("does not compile for sm_90: No space left on device")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "triton-cache"))
    triton.knobs.compilation.listener = listener
    start = time.perf_counter()
    try:
        k = triton.compile(src, target=arch.gpu_target(), options=options)
    except Exception as e:  # noqa: BLE001  (Triton raises many kinds; one line for the user)
        while e.__cause__ is not None:  # the code generator wraps the reason in CompilationErrors
            e = e.__cause__
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CompileError(f"Triton kernel {req['name']} does not compile for {arch.name}: {msg}") from None
    finally:
        triton.knobs.compilation.listener = None
    times = getattr(listener, "times", {}) or {"total": time.perf_counter() - start}
    md = k.metadata
    if md.shared > arch.max_shared:
        raise CompileError(f"Triton kernel {req['name']} needs {md.shared} bytes of shared memory; {arch.name} "
                           f"({arch.reference}) allows {arch.max_shared}")
    if md.num_ctas != 1 or md.launch_cooperative_grid or bool(getattr(md, "launch_pdl", False)) != bool(
            req.get("launch_pdl")):
        raise CompileError(f"Triton kernel {req['name']}: clusters, cooperative launches or PDL other than "
                           "requested are not supported")
    params = [tuple(a) for a in req["args"]] + list(HIDDEN_PARAMS)
    stages = STAGES[arch.backend]
    asm = {s: k.asm[s] for s in stages[:-1]}
    _check_params(asm[stages[-2]], params, arch.backend, req["name"])
    metadata = {
        "symbol": md.name, "num_warps": md.num_warps, "num_stages": md.num_stages, "warp_size": arch.warp_size,
        "shared": md.shared, "num_ctas": md.num_ctas, "params": [list(p) for p in params],
        "hints": [f"{t}:16" if a in req["aligned"] else t for a, t in req["args"]],
        "global_scratch_size": md.global_scratch_size, "global_scratch_align": md.global_scratch_align,
        "profile_scratch_size": md.profile_scratch_size, "profile_scratch_align": md.profile_scratch_align,
        "launch_cooperative_grid": bool(md.launch_cooperative_grid), "launch_pdl": bool(getattr(md, "launch_pdl", 0)),
        "target": {"backend": arch.backend, "arch": arch.arch, "warp_size": arch.warp_size},
        "triton_version": triton.__version__, "constexprs": req["constexprs"],
    }
    if arch.backend == "cuda":  # what a driver needs: PTX ISA (JIT) and the ptxas that built the cubin
        metadata["ptx_isa"] = re.search(r"^\.version\s+(\S+)", asm["ptx"], re.M).group(1)
        metadata["ptx_target"] = re.search(r"^\.target\s+(\w+)", asm["ptx"], re.M).group(1)
        metadata["ptxas"] = _ptxas_version(arch.arch)
    result = Compiled(key, arch.name, req["name"], k.asm[stages[-1]], asm, metadata, times)
    try:
        _store(entry, result)
    except OSError as e:  # the cache only saves work: a full or read-only disk costs only the compilation
        result.unstored = e.strerror or str(e)
    return result


def _ptxas_version(capability: int) -> str:
    """The release of the ptxas Triton uses for this capability (3.9: CUDA 12.9 below sm_90, the
    `ptxas-blackwell` of CUDA 13.x from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).version


def _check_params(text: str, params: list, backend: str, name: str) -> None:
    """The binary's own parameter list (sizes) must be `params`."""
    want = [8 if t.startswith("*") else PARAM_BYTES[t] for _, t in params]
    if backend == "cuda":
        m = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", text)
        got = [{"u64": 8, "b64": 8, "s64": 8, "f32": 4, "b32": 4, "s32": 4, "u32": 4}[t]
               for t in re.findall(r"\.param\s+\.(\w+)", m.group(1))] if m else None
    else:
        m = re.search(r"\.args:(.*?)\n\s*\.(?:group_segment_fixed_size|kernarg_segment_align)", text, re.S)
        got = [int(s) for s in re.findall(r"\.size:\s+(\d+)", m.group(1))] if m else None
    if got != want:
        raise CompileError(f"Triton kernel {name}: the binary takes parameters of {got} bytes, expected {want} "
                           f"({[p for p, _ in params]})")


def _store(entry: Path, c: Compiled) -> None:
    """Writes the cache entry atomically (a temporary directory renamed into place), with each
    file's sha256 in its metadata.json, so that a damaged entry is compiled again (_load)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        files = {f"kernel.{stage}": text.encode() for stage, text in c.asm.items()}
        files[f"kernel.{BINARY[get_arch(c.arch).backend]}"] = c.binary
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "metadata.json").write_text(json.dumps({
            "kernel": c.kernel, "metadata": c.metadata, "times": c.times,
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another process stored it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(entry: Path, key: str, arch: str) -> Compiled | None:
    """The kernel a cache entry holds; None when it is damaged or incomplete (a file missing,
    truncated or not matching its sha256: a crash before the disk had it all, a full disk), or was
    stored without the digests (an older llmirc's)."""
    backend = get_arch(arch).backend
    try:
        meta = json.loads((entry / "metadata.json").read_text())
        files = {}
        for name in [f"kernel.{s}" for s in STAGES[backend]]:
            files[name] = (entry / name).read_bytes()
            if hashlib.sha256(files[name]).hexdigest() != meta["sha256"][name]:
                return None
        asm = {s: files[f"kernel.{s}"].decode() for s in STAGES[backend][:-1]}
        return Compiled(key, arch, meta["kernel"], files[f"kernel.{BINARY[backend]}"], asm, meta["metadata"],
                        meta["times"], cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # (UnicodeDecodeError: a ValueError)
        return None


def sass(cubin: bytes) -> str:
    """SASS of a cubin, by the cuobjdump in Triton's wheel (triton/backends/nvidia/bin)."""
    from triton.tools.disasm import get_sass
    return get_sass(cubin)
