"""The cpu target's toolchain: CPU variants, LLVM IR -> object code, objects -> shared library.

A *variant* is one (triple, cpu, feature string) the kernels are compiled for. `native` is the
build host; the baseline (`x86-64-v2` on x86_64, `generic` on aarch64) runs on any machine of
that architecture from the last decade. `required_flags` are the /proc/cpuinfo flags a host
must have to run a variant's code; the loader checks them before choosing a library.
`aarch64-generic` (ARMv8-A with NEON) and `aarch64-dotprod` (and the dot product extension,
ARMv8.2's FEAT_DotProd: Neoverse N1, Cortex-A76 and later, Apple M1) compile for 64-bit Arm
Linux from any host: linking them needs the cross compiler `aarch64-linux-gnu-gcc`.

Objects go through a disk cache (`cached_objects`: keyed by the IR text, the variant, this file
and the LLVM version) and compile in spawned processes when several are missing. The kernels' IR
texts have a cache of their own (`ir_cache_entry`: keyed by what the text is generated from, and
llmirc's sources), so a compile whose objects are all cached emits nothing.

Optimization uses llvmlite's new pass manager (the default O3 pipeline, with loop and SLP
vectorization on) on a target machine for the variant, so the cost model and instruction
selection match the cpu. Linking uses the system C compiler driver (`cc`), which also compiles the
thread pool (runtime.c) into every library; the library needs only libc, libpthread and libm.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from llmirc.cache import store
from llmirc.errors import LlmircError, UsageError
from llmirc.scratch import scratch_dir
from llmirc.targets.workers import held_signals, run_tasks, worker_count, worker_pool

__all__ = [
    "CpuVariant", "host_variant", "baseline_variant", "variants_for", "known_variant_names",
    "compile_object", "cached_objects", "emit_assembly", "optimized_ir", "link_shared", "find_linker",
]


@dataclass(frozen=True)
class CpuVariant:
    name: str                      # 'native', 'x86-64-v2' (v3, v4), 'aarch64-generic', 'aarch64-dotprod'
    triple: str
    cpu: str                       # LLVM cpu name
    features: str                  # LLVM feature string ('+avx2,+fma,...'; '' = the cpu's own)
    vector_width: int              # f32 lanes of the widest vector register the kernels use
    required_flags: tuple[str, ...]  # /proc/cpuinfo flags a host needs to run this code
    # Decode (one group of tokens) reads a weight one row at a time, in address order, rather than
    # in the prefill's blocks of rows side by side: 1.5-2x faster on AMD Zen 4, 5-15% slower on an
    # Intel Xeon (BENCHMARKS.md, "Decode one row at a time" and "... on Intel"). So only a native
    # variant on an Intel CPU reads row blocks; the portable ones take the smaller worst case.
    one_row_decode: bool = True

    def has(self, feature: str) -> bool:
        """Whether the feature string enables `feature` (an LLVM name: amx-bf16, avx512bf16, ...)."""
        return f"+{feature}" in self.features.split(",")

    @property
    def arch(self) -> str:
        """The architecture the code is for (`x86_64`, `aarch64`), from the triple."""
        return "aarch64" if self.triple.startswith(("aarch64", "arm64")) else self.triple.split("-")[0]


# --- LLVM initialization (llvmlite >= 0.45 initializes the core itself; targets still need it)

_init_lock = threading.Lock()
_initialized = False


def _init_llvm() -> None:
    global _initialized
    if _initialized:
        return
    with _init_lock:
        if not _initialized:
            llvm.initialize_all_targets()
            llvm.initialize_all_asmprinters()
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _initialized = True


# --- variants

# LLVM x86 feature name -> /proc/cpuinfo flag, for the features compiled code can depend on.
_X86_CPUINFO = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "cx16": "cx16", "sahf": "lahf_lm", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512fp16": "avx512_fp16", "avx512vp2intersect": "avx512_vp2intersect",
    "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni", "adx": "adx", "sse4a": "sse4a",
    "prfchw": "3dnowprefetch", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8",
}

# LLVM AArch64 feature name -> the /proc/cpuinfo (and AT_HWCAP/AT_HWCAP2) name, for the features
# compiled code can depend on.
_ARM64_CPUINFO = {
    "neon": "asimd", "fullfp16": "asimdhp", "rdm": "asimdrdm", "dotprod": "asimddp", "lse": "atomics",
    "crc": "crc32", "aes": "aes", "sha2": "sha2", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm", "bf16": "bf16",
}

_X86_LEVELS = {
    "x86-64-v2": ("ssse3", "sse4_1", "sse4_2", "popcnt"),
    "x86-64-v3": ("ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1",
                  "bmi2", "abm", "movbe"),
    "x86-64-v4": ("ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1",
                  "bmi2", "abm", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq",
                  "avx512vl"),
}
_X86_LEVEL_WIDTH = {"x86-64-v2": 4, "x86-64-v3": 8, "x86-64-v4": 16}


def _arch() -> str:
    m = platform.machine().lower()
    if m in ("amd64", "x86_64"):
        return "x86_64"
    if m in ("arm64", "aarch64"):
        return "aarch64"
    return m


def _width_from_features(enabled: set[str], arch: str) -> int:
    if arch == "x86_64":
        if "avx512f" in enabled:
            return 16
        if "avx2" in enabled:
            return 8
    return 4


def host_variant() -> CpuVariant:
    """The build host's cpu with all of its features ('native')."""
    _init_llvm()
    arch = _arch()
    feats = llvm.get_host_cpu_features()
    enabled = {k for k, v in feats.items() if v}
    if arch == "x86_64":
        flags = tuple(sorted({_X86_CPUINFO[f] for f in enabled if f in _X86_CPUINFO}))
    elif arch == "aarch64":  # LLVM may use any of them (SVE when vectorizing): a host must have them all
        flags = tuple(sorted({"asimd"} | {_ARM64_CPUINFO[f] for f in enabled if f in _ARM64_CPUINFO}))
    else:
        flags = ()
    return CpuVariant(
        name="native",
        triple=llvm.get_process_triple(),
        cpu=llvm.get_host_cpu_name(),
        features=feats.flatten(),
        vector_width=_width_from_features(enabled, arch),
        required_flags=flags,
        one_row_decode=_cpu_vendor() != "GenuineIntel",
    )


def _cpu_vendor() -> str:
    """The build host's x86 vendor (/proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD, ...),
    '' where it does not say."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


_AARCH64_TRIPLE = "aarch64-unknown-linux-gnu"
_AARCH64 = {  # variants for 64-bit Arm Linux, compiled on any host
    "aarch64-generic": ("+neon", ("asimd",)),
    "aarch64-dotprod": ("+neon,+dotprod", ("asimd", "asimddp")),
}


def _level_variant(name: str) -> CpuVariant:
    _init_llvm()
    if name in _AARCH64:
        features, flags = _AARCH64[name]
        return CpuVariant(name, _AARCH64_TRIPLE, "generic", features, 4, flags)
    if name in _X86_LEVELS:
        if _arch() != "x86_64":
            raise LlmircError(f"cpu variant {name!r} needs an x86_64 build host")
        return CpuVariant(name, llvm.get_process_triple(), name, "", _X86_LEVEL_WIDTH[name],
                          _X86_LEVELS[name])
    if name == "generic":  # this host's architecture's baseline (one library with aarch64-generic's name)
        arch = _arch()
        if arch == "aarch64":
            return _level_variant("aarch64-generic")
        if arch == "x86_64":
            return _level_variant("x86-64-v2")
    raise UsageError(f"unknown cpu variant {name!r} (known: {', '.join(known_variant_names())})")


def baseline_variant() -> CpuVariant:
    """The portable variant: x86-64-v2 on x86_64, aarch64-generic (NEON) on aarch64."""
    return _level_variant("generic")


def known_variant_names() -> list[str]:
    if _arch() == "x86_64":
        return ["native", "baseline", "x86-64-v2", "x86-64-v3", "x86-64-v4", *_AARCH64]
    return ["native", "baseline", "generic", *_AARCH64]


def variants_for(names: list[str]) -> list[CpuVariant]:
    """Variants by name (known_variant_names), duplicates dropped."""
    out: list[CpuVariant] = []
    for name in names:
        if name == "native":
            v = host_variant()
        elif name == "baseline":
            v = baseline_variant()
        else:
            v = _level_variant(name)
        if v not in out:
            out.append(v)
    return out


# --- compilation

def _target_machine(variant: CpuVariant, opt_level: int):
    _init_llvm()
    target = llvm.Target.from_triple(variant.triple)
    return target.create_target_machine(cpu=variant.cpu, features=variant.features,
                                        opt=opt_level, reloc="pic", codemodel="default")


def _optimized_module(llvm_ir: str, variant: CpuVariant, opt_level: int, extra: tuple[str, ...] = ()):
    tm = _target_machine(variant, opt_level)
    mod = llvm.parse_assembly(llvm_ir)
    mod.triple = variant.triple
    mod.data_layout = str(tm.target_data)
    for text in extra:  # modules written as LLVM IR text (e.g. AMX micro-kernels), linked in
        other = llvm.parse_assembly(text)
        other.data_layout = mod.data_layout
        mod.link_in(other)
    mod.verify()
    if opt_level > 0:
        pto = llvm.create_pipeline_tuning_options(speed_level=opt_level)
        pto.loop_vectorization = True
        pto.slp_vectorization = True
        pto.loop_interleaving = True
        pto.loop_unrolling = True
        pb = llvm.create_pass_builder(tm, pto)
        pm = pb.getModulePassManager()
        pm.run(mod, pb)
    return tm, mod


def compile_object(llvm_ir: str, variant: CpuVariant, opt_level: int = 3, extra: tuple[str, ...] = ()) -> bytes:
    """Parse, verify, optimize (O3 + vectorizers) and emit an ELF/Mach-O object for `variant`;
    `extra`: LLVM IR texts linked in first."""
    tm, mod = _optimized_module(llvm_ir, variant, opt_level, extra)
    return tm.emit_object(mod)


_PIPELINE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # what compile_object does to IR


@functools.cache
def _source_digest() -> str:
    """The sha256 of llmirc's Python sources (every .py file of its packages, by path and content):
    what the kernels' IR texts are generated from."""
    files = {f.resolve() for pkg in ("llmirc", "llmirc.targets", "llmirc.passes", "llmirc.artifact_format")
             for root in importlib.import_module(pkg).__path__ for f in Path(root).rglob("*.py")}
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.fsencode(f"{f.parent.name}/{f.name}\0") + f.read_bytes())
    return h.hexdigest()


def ir_cache_entry(cache: Path | None, key: list) -> Path | None:
    """Where the IR cache `cache` keeps the text generated from `key` (JSON-able: what the text
    depends on besides llmirc's sources and the llvmlite version, which are added). None: no cache.
    Entries are read and written with read_entry and write_entry."""
    if cache is None:
        return None
    digest = hashlib.sha256(json.dumps([_source_digest(), llvmlite.__version__, key]).encode()).hexdigest()
    return cache / digest[:2] / digest


def cached_objects(units: dict, cache: Path | None, jobs: int | None = None,
                   warn: Callable[[str], None] = lambda message: None, refresh: bool = False) -> dict:
    """compile_object (-O3) of each unit, {key: (LLVM IR text, CpuVariant)}, through a disk cache;
    returns {key: (object, whether it came from the cache)}. Units not in the cache compile `jobs`
    processes at a time (default and most: the usable CPUs; targets/workers.py), each stored as
    soon as it is compiled, so an interrupted compile keeps what it finished.

    An entry's key is the sha256 of the text, the variant (triple, cpu, features), this file (its
    optimization pipeline) and the llvmlite and LLVM versions: it holds the object those inputs
    compile to. An entry is the object's sha256 then the object, written to a temporary file
    renamed into place, so a reader never sees half of one; an entry whose digest does not match
    is compiled again; `refresh` compiles and stores every unit whatever the cache holds. A cache
    that cannot be written costs only the compilation (`warn` is told why, once). `cache` None: no
    cache. Raises RuntimeError for IR that LLVM rejects (a bug in llmirc), and workers.WorkerDied
    (a RuntimeError) when LLVM crashes."""
    entries = {key: _cache_entry(cache, *unit) for key, unit in units.items()}
    out = {} if refresh else {key: (obj, True) for key, entry in entries.items()
                              if (obj := read_entry(entry)) is not None}
    missing = [key for key in units if key not in out]
    warned = False

    def done(key, obj: bytes) -> None:
        nonlocal warned
        out[key] = (obj, False)
        problem = write_entry(entries[key], obj)
        if problem and not warned:
            warned = True
            warn(f"the kernel cache {cache} cannot be written ({problem}): nothing compiled now is kept")

    if missing:  # (in workers even for one: an LLVM crash kills a worker, not the compile)
        with worker_pool(worker_count(jobs, len(missing))) as pool:
            run_tasks(pool, {key: (compile_object, *units[key]) for key in missing}, done,
                      name=lambda key: " for ".join(reversed(key)) if isinstance(key, tuple) else str(key))
    return {key: out[key] for key in units}


def _cache_entry(cache: Path | None, text: str, variant: CpuVariant) -> Path | None:
    if cache is None:
        return None
    key = hashlib.sha256(json.dumps([_PIPELINE, llvmlite.__version__, list(llvm.llvm_version_info),
                                     variant.triple, variant.cpu, variant.features, text]).encode()).hexdigest()
    return cache / key[:2] / key


def read_entry(entry: Path | None) -> bytes | None:
    """The data stored at a cache entry; None when there is none, or its digest does not match."""
    try:
        data = entry.read_bytes() if entry is not None else b""
    except OSError:
        return None
    return data[32:] if len(data) > 32 and hashlib.sha256(data[32:]).digest() == data[:32] else None


def write_entry(entry: Path | None, obj: bytes) -> str | None:
    """Stores `obj` at `entry`; returns why it could not (None when it did)."""
    return None if entry is None else store(entry, hashlib.sha256(obj).digest() + obj)


def linked_module(texts: list[str], variant: CpuVariant, optimized: bool):
    """(target machine, one module of all `texts`), each text optimized as compile_object does
    when `optimized` (then linked: what the objects of the texts hold, for `--emit asm`), else
    as written (`--emit llvm-ir`)."""
    modules = [_optimized_module(text, variant, 3 if optimized else 0)[1] for text in texts]
    for other in modules[1:]:
        modules[0].link_in(other)
    return _target_machine(variant, 3), modules[0]


def emit_assembly(llvm_ir: str, variant: CpuVariant, opt_level: int = 3, extra: tuple[str, ...] = ()) -> str:
    """Like compile_object, but returns the assembly text (for inspection and tests)."""
    tm, mod = _optimized_module(llvm_ir, variant, opt_level, extra)
    return tm.emit_assembly(mod)


def optimized_ir(llvm_ir: str, variant: CpuVariant, opt_level: int = 3) -> str:
    """The module after the optimization pipeline, as LLVM IR text (for inspection)."""
    return str(_optimized_module(llvm_ir, variant, opt_level)[1])


# --- linking

def find_linker(arch: str | None = None) -> str:
    """The C compiler that links for `arch` (default: this host's): cc, gcc or clang here, else the
    cross compiler `<arch>-linux-gnu-gcc`."""
    if arch is None or arch == _arch():
        for name in ("cc", "gcc", "clang"):
            path = shutil.which(name)
            if path:
                return path
        raise LlmircError("no C compiler (cc) found: install gcc or clang to compile for the cpu target")
    name = f"{arch}-linux-gnu-gcc"
    path = shutil.which(name)
    if path is None:
        raise LlmircError(f"no {name} found: linking a library for {arch} on this {_arch()} host needs the cross "
                          f"compiler (Debian and Ubuntu: apt install gcc-{arch.replace('_', '-')}-linux-gnu)")
    return path


RUNTIME_C = Path(__file__).with_name("runtime.c")  # the thread pool every library links


def link_shared(objects: list[bytes], out_path: Path, arch: str | None = None) -> Path:
    """Link object files and the runtime (runtime.c, compiled for the baseline of the architecture)
    into a shared library at `out_path` (with -lpthread -lm); `arch`: the objects' architecture
    (default: this host's; another needs its cross compiler, `find_linker`)."""
    cc = find_linker(arch)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir("link") as tmp:
        paths = []
        for i, obj in enumerate(objects):
            p = Path(tmp) / f"part{i}.o"
            try:
                p.write_bytes(obj)
            except OSError as e:  # a full TMPDIR: its write names no file
                raise OSError(e.errno, e.strerror, str(p)) from None
            paths.append(str(p))
        tmp_out = Path(tmp) / out_path.name
        cmd = [cc, "-shared", "-O2", "-fPIC", "-std=c11", "-o", str(tmp_out), *paths, str(RUNTIME_C),
               "-lpthread", "-lm"]
        if platform.system() == "Linux":
            cmd[2:2] = ["-Wl,--no-undefined", "-Wl,-z,noexecstack"]
        try:  # (cc's own temporary files in the scratch folder too: a compile stopped during the link kills
            # cc, which then cannot remove them)
            proc = _run_group(cmd, env=dict(os.environ, TMPDIR=tmp))
        except OSError as e:
            raise LlmircError(f"could not run the C linker {cc}: {e}") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            detail = " | ".join(lines[:3]) if lines else f"exit status {proc.returncode}"
            raise LlmircError(f"linking {out_path.name} failed: {detail}")
        shutil.move(str(tmp_out), str(out_path))
    return out_path


def _run_group(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own, which is
    killed whole when this process is stopped (Ctrl-C, SIGTERM: an exception here): cc's children
    (cc1, as, ld) ran on after subprocess.run killed cc alone."""
    import signal

    proc = None
    try:
        with held_signals():  # (a stop inside Popen, once cc runs, would leave it no pid to kill: a loaded CI host)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        out, err = proc.communicate()
    except BaseException:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
