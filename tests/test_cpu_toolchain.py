"""The cpu toolchain: variants, object/assembly emission, linking and its errors."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import platform
import re
import shutil
import subprocess
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from llvmlite import ir

from llmirc.errors import LlmircError
from llmirc.targets.cpu import kernels as K
from llmirc.targets.cpu import toolchain as tc

X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpuinfo_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M)
    return set(m.group(2).split()) if m else set()


def small_module(variant, name="tc_add", linear: bool = True) -> str:
    """An add kernel and (unless not `linear`: a tenth of the compile time) a threaded linear."""
    m = ir.Module(name="tc")
    K.emit_kernel(m, "add", name, dict(dim=19), variant)
    if linear:
        K.emit_kernel(m, "linear", name + "_lin", dict(n=8, k=64), variant)
    return str(m)


# --- variants

def test_host_variant():
    v = tc.host_variant()
    assert v.name == "native"
    assert v.cpu and v.triple
    flags = cpuinfo_flags()
    if flags:
        assert set(v.required_flags) <= flags, set(v.required_flags) - flags
    if X86:
        expect = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        assert v.vector_width == expect
        if "avx2" in flags:
            assert "+avx2" in v.features.split(",") and "avx2" in v.required_flags
        if "avx512f" in flags:
            assert {"avx512f", "fma"} <= set(v.required_flags)


def test_baseline_variant():
    v = tc.baseline_variant()
    if X86:
        assert v.name == "x86-64-v2" and v.cpu == "x86-64-v2"
        assert {"sse4_2", "popcnt", "ssse3"} <= set(v.required_flags)
        assert v.vector_width == 4
    else:
        assert v.name == "aarch64-generic" and v.vector_width == 4
    flags = cpuinfo_flags()
    if flags:
        assert set(v.required_flags) <= flags


def test_variant_is_frozen_and_hashable():
    v = tc.baseline_variant()
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.name = "x"  # type: ignore[misc]
    assert len({v, tc.baseline_variant()}) == 1


def test_variants_for():
    vs = tc.variants_for(["native", tc.baseline_variant().name, "native"])
    assert [v.name for v in vs] == ["native", tc.baseline_variant().name]
    assert tc.variants_for(["baseline"]) == [tc.baseline_variant()]
    with pytest.raises(LlmircError, match="unknown cpu variant 'pentium2'"):
        tc.variants_for(["pentium2"])


@pytest.mark.skipif(not X86, reason="x86-64 levels")
def test_x86_levels():
    v3, v4 = tc.variants_for(["x86-64-v3", "x86-64-v4"])
    assert (v3.vector_width, v4.vector_width) == (8, 16)
    assert "avx2" in v3.required_flags and "avx512f" in v4.required_flags


# --- compilation

def test_compile_object_is_an_object_file_with_the_symbols():
    v = tc.host_variant()
    obj = tc.compile_object(small_module(v), v)
    assert isinstance(obj, bytes)
    if platform.system() == "Linux":
        assert obj[:4] == b"\x7fELF"
    assert b"tc_add" in obj and b"tc_add_lin" in obj
    assert b"llmir_parallel" in obj  # the linear kernel is threaded (runtime.c)


@pytest.mark.skipif(not X86, reason="x86 registers")
def test_assembly_uses_the_variant_isa():
    base = tc.baseline_variant()
    asm = tc.emit_assembly(small_module(base), base)
    assert "xmm" in asm and "ymm" not in asm and "zmm" not in asm
    host = tc.host_variant()
    asm = tc.emit_assembly(small_module(host), host)
    if host.vector_width == 16:
        assert "zmm" in asm and "vfmadd" in asm
    elif host.vector_width == 8:
        assert "ymm" in asm


def test_aarch64_variants_from_any_host():
    generic, dotprod = tc.variants_for(["aarch64-generic", "aarch64-dotprod"])
    assert generic.arch == dotprod.arch == "aarch64" and generic.vector_width == 4
    assert generic.required_flags == ("asimd",) and dotprod.required_flags == ("asimd", "asimddp")
    assert dotprod.has("dotprod") and not generic.has("dotprod")


def test_generic_on_an_aarch64_host_is_aarch64_generic(monkeypatch):
    """On an aarch64 build host baseline, generic and aarch64-generic are one library (two would
    share the target name cpu-aarch64-generic); an unknown name's error lists them all."""
    monkeypatch.setattr(tc, "_arch", lambda: "aarch64")
    assert tc.variants_for(["baseline", "generic", "aarch64-generic"]) == tc.variants_for(["aarch64-generic"])
    with pytest.raises(LlmircError, match="known: native, baseline, generic, aarch64-generic, aarch64-dotprod"):
        tc.variants_for(["aarch64"])


def test_native_on_an_aarch64_host_requires_every_feature_llvm_may_use(monkeypatch):
    """A native aarch64 library may hold SVE, i8mm or bf16 instructions (LLVM's choice on such a
    host): it requires them, so an older aarch64 CPU runs the generic library instead of
    faulting."""
    class Features(dict):
        def flatten(self):
            return ",".join(("+" if v else "-") + k for k, v in self.items())

    monkeypatch.setattr(tc, "_arch", lambda: "aarch64")
    monkeypatch.setattr(tc.llvm, "get_host_cpu_features",
                        lambda: Features(neon=True, dotprod=True, sve=True, i8mm=True, bf16=False, sme=True))
    assert tc.host_variant().required_flags == ("asimd", "asimddp", "i8mm", "sve")


@pytest.mark.skipif(not X86, reason="cross compiles from x86-64")
def test_a_missing_cross_linker_fails_before_the_weights_are_written(monkeypatch, tmp_path):

    from helpers import make_checkpoint
    from llmirc.driver import CompileOptions, Progress, compile_model

    make_checkpoint(tmp_path / "ckpt", "llama")
    which = shutil.which
    monkeypatch.setattr(tc.shutil, "which", lambda name: None if name.endswith("-linux-gnu-gcc") else which(name))
    log, options = StringIO(), CompileOptions(cpu_variants=("native", "aarch64-generic"))
    with pytest.raises(LlmircError, match="no aarch64-linux-gnu-gcc found"):
        compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", options, Progress(log))
    assert "writing" not in log.getvalue() and not (tmp_path / "m.llmir").exists()
    ir = StringIO()  # nor before the IR is printed, when a bundle is written too
    with pytest.raises(LlmircError, match="no aarch64-linux-gnu-gcc found"):
        compile_model(tmp_path / "ckpt", tmp_path / "m.llmir", dataclasses.replace(options, emit="mlir"), Progress(log),
                      stdout=ir)
    assert ir.getvalue() == "" and "running passes" not in log.getvalue() and not (tmp_path / "m.llmir").exists()
    asm = StringIO()  # printing a stage links nothing
    compile_model(tmp_path / "ckpt", None, dataclasses.replace(options, emit="asm", cpu_variants=("aarch64-generic",)),
                  Progress(None), stdout=asm)
    assert "fmla\tv" in asm.getvalue()


def test_recompiling_a_model_reads_its_kernels_from_the_cache(monkeypatch, tmp_path):
    """Each kernel, the forward and the AMX micro-kernels are objects of their own (the unit of the
    cache): compiling the same checkpoint again compiles none of them, emits no kernel's IR (the IR
    cache) and links the same library."""
    from helpers import make_checkpoint
    from llmirc.driver import CompileOptions, Progress, compile_model

    monkeypatch.setenv("LLMIRC_CACHE_DIR", str(tmp_path / "cache"))
    make_checkpoint(tmp_path / "ckpt", "llama")
    libraries, counts = [], []
    for out in ("a.llmir", "b.llmir"):
        log = StringIO()
        compile_model(tmp_path / "ckpt", tmp_path / out, CompileOptions(cpu_variants=("baseline",)), Progress(log))
        (target,) = json.loads((tmp_path / out / "manifest.json").read_text())["targets"]
        libraries.append((target["library"], (tmp_path / out / target["library"]).read_bytes()))
        counts.append(re.search(r"cpu: (\d+) objects \((\d+) from the cache\)", log.getvalue()).groups())
        if out == "a.llmir":
            mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "cpu-ir").rglob("*")) if p.is_file()]
    assert libraries[0] == libraries[1]
    units = len(target["kernels"]) + 1
    assert counts == [(str(units), "0"), (str(units), str(units))]
    # The kernels' IR texts were cached by the first compile and read by the second: it emitted none.
    texts = sorted(p for p in (tmp_path / "cache" / "cpu-ir").rglob("*") if p.is_file())
    assert len(texts) == len(target["kernels"])
    assert all(p.stat().st_mtime_ns == m for p, m in zip(texts, mtimes))
    # An IR entry that does not decompress (a good digest: a bug, or a forged file) is made again.
    junk = b"not zlib"
    texts[0].write_bytes(tc.hashlib.sha256(junk).digest() + junk)
    compile_model(tmp_path / "ckpt", tmp_path / "d.llmir", CompileOptions(cpu_variants=("baseline",)), Progress(None))
    assert len(texts[0].read_bytes()) > 100
    # An entry with a good digest but a bad object (a bug, or a forged file): the link fails, the
    # cached units are compiled again, the entry is repaired.
    entry = max((p for p in (tmp_path / "cache" / "cpu").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    bad = entry.read_bytes()[32:][:1000]
    entry.write_bytes(tc.hashlib.sha256(bad).digest() + bad)
    log = StringIO()
    compile_model(tmp_path / "ckpt", tmp_path / "c.llmir", CompileOptions(cpu_variants=("baseline",)), Progress(log))
    assert "linking objects from the kernel cache failed" in log.getvalue(), log.getvalue()
    (target,) = json.loads((tmp_path / "c.llmir" / "manifest.json").read_text())["targets"]
    assert target["library"] == libraries[0][0]
    assert len(entry.read_bytes()) > 1032


def test_emit_and_intermediates_are_one_module_per_library(monkeypatch, tmp_path):
    """--emit llvm-ir parses as one module and --emit asm assembles (the units linked into one);
    --keep-intermediates stores both and every object; a cache that cannot be written is noted."""
    from helpers import make_checkpoint
    from llmirc.driver import CompileOptions, Progress, compile_model

    make_checkpoint(tmp_path / "ckpt", "llama")
    options = CompileOptions(cpu_variants=("native",), jobs=1)
    for stage in ("llvm-ir", "asm"):
        out = StringIO()
        compile_model(tmp_path / "ckpt", None, dataclasses.replace(options, emit=stage), Progress(None), stdout=out)
        if stage == "llvm-ir":
            assert tc.llvm.parse_assembly(out.getvalue()).get_function("llmir_forward")
        else:
            (tmp_path / "m.s").write_text(out.getvalue())
            r = subprocess.run([tc.find_linker(), "-c", str(tmp_path / "m.s"), "-o", str(tmp_path / "m.o")],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[:2000]
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("LLMIRC_CACHE_DIR", str(blocked))
    log = StringIO()
    compile_model(tmp_path / "ckpt", tmp_path / "k.llmir", dataclasses.replace(options, keep_intermediates=True),
                  Progress(log))
    (target,) = json.loads((tmp_path / "k.llmir" / "manifest.json").read_text())["targets"]
    folder = tmp_path / "k.llmir" / "kernels" / target["name"]
    assert (folder / "model.ll").stat().st_size and (folder / "model.s").stat().st_size
    assert sorted(p.stem for p in (folder / "obj").iterdir()) == sorted([k["symbol"] for k in target["kernels"]]
                                                                         + ["llmir_forward"])
    assert log.getvalue().count(f"note: the kernel cache {blocked}/cpu cannot be written") == 1, log.getvalue()


@pytest.mark.skipif(platform.system() != "Linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_that_dies_is_an_error_naming_the_tasks_left():
    """Native code that crashes (an assertion in llvmlite's LLVM aborted a compile) kills a worker,
    not the compile: run_tasks raises WorkerDied naming the tasks left (the CLI's internal error),
    not concurrent.futures' BrokenProcessPool; a task's own error propagates as it is."""
    import os

    from llmirc.targets.workers import WorkerDied, run_tasks, worker_pool

    with pytest.raises(WorkerDied, match=r"crashed \(in native code; .*\) on one of 1 unfinished: crash$"):
        with worker_pool(1) as pool:
            run_tasks(pool, {"fine": (abs, -1), "crash": (os._exit, 3)})
    with worker_pool(1) as pool:
        assert run_tasks(pool, {"a": (abs, -2), "b": (abs, 3)}) == {"a": 2, "b": 3}
        with pytest.raises(ValueError, match="invalid literal"):
            run_tasks(pool, {"bad": (int, "x")})


def test_killed_workers_cannot_leave_the_pool_waiting_for_a_half_written_result():
    """A worker killed in the middle of writing its result leaves part of a message in the
    result pipe; the pool's manager thread then waited for the rest for good, and so did the
    exit of the process, which joins it (a compile's SIGTERM hung in CI). Here the half message is
    written by hand, then the pool is killed as an exception out of worker_pool kills it."""
    import os
    import struct
    import time

    from llmirc.targets.workers import worker_pool

    with pytest.raises(KeyboardInterrupt):
        with worker_pool(1) as pool:
            pool.submit(time.sleep, 30)
            manager = pool._executor_manager_thread
            os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 100) + b"x" * 10)  # 10 of 100 bytes
            time.sleep(0.5)  # (the manager thread is now reading the rest)
            assert manager.is_alive()
            raise KeyboardInterrupt
    manager.join(timeout=20)
    assert not manager.is_alive()


def _start_sleeper() -> int:
    """(A pool task:) starts a process that runs on, as Triton's ptxas does in a worker; its pid."""
    import subprocess

    return subprocess.Popen(["sleep", "60"]).pid


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(platform.system() != "Linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_workers_take_the_tools_they_run_with_them():
    """A stop kills the workers' process groups, not the workers alone: a ptxas a killed worker ran
    went on writing into the compile's scratch folder as it was removed ('Directory not empty', an
    internal error, and its file left in TMPDIR)."""
    import os
    import signal
    import time

    from llmirc.targets.workers import worker_pool

    with pytest.raises(KeyboardInterrupt):
        with worker_pool(1) as pool:
            sleeper = pool.submit(_start_sleeper).result()
            raise KeyboardInterrupt
    deadline = time.monotonic() + 10
    while _running(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive := _running(sleeper):
        os.kill(sleeper, signal.SIGKILL)  # (not left running when this fails)
    assert not alive


def test_compile_workers_die_with_the_compile(tmp_path):
    """A compile killed with SIGKILL (or by the out-of-memory killer) leaves no worker behind."""
    import os
    import signal
    import sys
    import time

    from helpers import make_checkpoint

    make_checkpoint(tmp_path / "ckpt", "llama")
    env = dict(os.environ, LLMIRC_CACHE_DIR=str(tmp_path / "cache"))
    cli = "import sys; from llmirc.cli import main; sys.argv = ['llmirc', *sys.argv[1:]]; main()"
    proc = subprocess.Popen([sys.executable, "-c", cli, "compile", str(tmp_path / "ckpt"), "-o",
                             str(tmp_path / "m.llmir"), "-j", "2", "-q"], env=env, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    out.append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                pass
        return out

    deadline = time.monotonic() + 120
    while len(workers := children()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(workers) < 2:
        proc.kill()
        pytest.skip("the compile ended before its workers were seen")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while (alive := [p for p in workers if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:  # (not left running when this fails)
        os.kill(pid, signal.SIGKILL)
    assert not alive


@pytest.mark.skipif(platform.system() != "Linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_ctrl_c_kills_busy_workers_and_exits(tmp_path):
    """Ctrl-C, as a terminal sends it (SIGINT to the whole process group), twice, while a worker
    is busy: the parent exits at once with KeyboardInterrupt and its worker, which ignores SIGINT,
    is killed, not waited for. (Waiting could hang for good: a Ctrl-C in the executor's shutdown
    left the exit waiting for an idle worker.)"""
    import os
    import signal
    import sys
    import time

    script = tmp_path / "pool.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from llmirc.targets.workers import worker_pool\n"
        "if __name__ == '__main__':\n"
        "    signal.signal(signal.SIGINT, signal.default_int_handler)  # (xdist's workers ignore it: exec keeps that)\n"
        "    with worker_pool(1) as pool:\n"
        "        pid = pool.submit(os.getpid).result()\n"
        "        print(pid, flush=True)\n"
        "        pool.submit(time.sleep, 300).result()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    worker = int(proc.stdout.readline())
    time.sleep(0.5)
    start = time.monotonic()
    for _ in range(2):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 10 and "KeyboardInterrupt" in proc.stderr.read()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()


def test_cross_linking_needs_the_cross_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(tc.shutil, "which", lambda name: None)
    other = "x86_64" if not X86 else "aarch64"
    with pytest.raises(LlmircError, match=f"no {other}-linux-gnu-gcc found: .*apt install gcc-"):
        tc.link_shared([b""], tmp_path / "x.so", other)


@pytest.mark.skipif(not X86 or shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
def test_cross_link_an_aarch64_library(tmp_path):
    v = tc.variants_for(["aarch64-generic"])[0]
    lib = tc.link_shared([tc.compile_object(small_module(v), v)], tmp_path / "lib.so", v.arch)
    data = lib.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 0xB7  # EM_AARCH64
    assert b"llmir_parallel" in data


def test_cross_compile_to_the_other_arch():
    """Kernels lower for an architecture other than the host's (no host features leak in)."""
    other = (tc.variants_for(["aarch64-generic"])[0] if X86 else
             tc.CpuVariant("x86-64-v3", "x86_64-unknown-linux-gnu", "x86-64-v3", "", 8, ()))
    try:
        obj = tc.compile_object(small_module(other), other)
    except RuntimeError as e:  # an LLVM build without that target
        pytest.skip(str(e))
    assert obj[:4] == b"\x7fELF"
    machine = int.from_bytes(obj[18:20], "little")
    assert machine == (0xB7 if X86 else 0x3E)  # EM_AARCH64 / EM_X86_64


def test_opt_level_zero_also_compiles():
    v = tc.baseline_variant()
    assert tc.compile_object(small_module(v), v, opt_level=0)


def test_invalid_ir_is_rejected():
    with pytest.raises(RuntimeError):
        tc.compile_object("define void @f() { ret i32 0 }", tc.baseline_variant())


def test_cache_write_stopped_by_a_signal_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C (or the CLI's SIGTERM) while an entry is stored: the signal goes on, and the entry's
    temporary file (.tmp-XXXXXXXX) does not stay in the cache for good (only OSErrors removed it)."""
    entry = tmp_path / "cache" / "ab" / "abcd"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tc.write_entry(entry, b"object")
    assert list((tmp_path / "cache").rglob("*")) == [entry.parent]


def test_object_cache(tmp_path):
    """A second compilation of the same IR for the same variant is read from the cache; another
    text or variant is not; a damaged entry is compiled again and repaired; a cache that cannot be
    written costs only the time; objects compiled in worker processes are the same."""
    v, cache = tc.baseline_variant(), tmp_path / "cache"
    text = small_module(v, linear=False)
    obj = tc.compile_object(text, v)

    def one(text, variant=v, cache=cache):
        return tc.cached_objects({"unit": (text, variant)}, cache)["unit"]

    assert one(text) == (obj, False)
    assert one(text) == (obj, True)
    assert one(small_module(v, "other", False))[1] is False
    if X86:
        assert one(small_module(tc.host_variant(), linear=False), tc.host_variant())[1] is False
    (entry,) = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes()[32:] == obj]
    data = bytearray(entry.read_bytes())
    data[-1] ^= 1
    entry.write_bytes(bytes(data))
    assert one(text) == (obj, False)
    assert one(text) == (obj, True)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert one(text, cache=blocked) == (obj, False)
    assert one(text, cache=None) == (obj, False)
    assert not list(cache.rglob(".tmp-*"))

    texts = {name: small_module(v, name, False) for name in ("p0", "p1", "p2")}
    pooled = tc.cached_objects({**{n: (t, v) for n, t in texts.items()}, "unit": (text, v)}, tmp_path / "p", jobs=2)
    assert list(pooled) == ["p0", "p1", "p2", "unit"]
    assert pooled == {**{n: (tc.compile_object(t, v), False) for n, t in texts.items()}, "unit": (obj, False)}


# --- linking

def test_link_shared_and_call(tmp_path):
    v = tc.baseline_variant()
    out = tc.link_shared([tc.compile_object(small_module(v), v)], tmp_path / "sub" / "lib.so")
    assert out.exists()
    lib = ctypes.CDLL(str(out))
    f = lib.tc_add
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64]
    a = np.arange(2 * 19, dtype=np.float32).reshape(2, 19)
    b = np.ones((2, 19), np.float32)
    o = np.zeros((2, 19), np.float32)
    f(o.ctypes.data, 19, a.ctypes.data, 19, b.ctypes.data, 19, 2)
    np.testing.assert_array_equal(o, a + b)


def test_link_several_objects(tmp_path):
    v = tc.baseline_variant()
    o1 = tc.compile_object(small_module(v, "first"), v)
    o2 = tc.compile_object(small_module(v, "second"), v)
    lib = ctypes.CDLL(str(tc.link_shared([o1, o2], tmp_path / "two.so")))
    assert lib.first and lib.second


def test_missing_linker(monkeypatch, tmp_path):
    monkeypatch.setattr(tc.shutil, "which", lambda name: None)
    with pytest.raises(LlmircError, match=r"no C compiler \(cc\) found: install gcc or clang"):
        tc.link_shared([b""], tmp_path / "x.so")


def test_linker_that_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setattr(tc.shutil, "which", lambda name: str(tmp_path / "no-such-cc"))
    with pytest.raises(LlmircError, match="could not run the C (compiler|linker)"):
        tc.link_shared([b""], tmp_path / "x.so")


def test_link_error_surfaces_stderr(tmp_path):
    v = tc.baseline_variant()
    m = ir.Module(name="bad")
    callee = ir.Function(m, ir.FunctionType(ir.VoidType(), []), "llmirc_no_such_function")
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), []), "caller")
    b = ir.IRBuilder(fn.append_basic_block())
    b.call(callee, [])
    b.ret_void()
    obj = tc.compile_object(str(m), v)
    with pytest.raises(LlmircError, match="linking bad.so failed: .*llmirc_no_such_function"):
        tc.link_shared([obj], tmp_path / "bad.so")
    assert not (tmp_path / "bad.so").exists()


def test_garbage_object_is_a_link_error(tmp_path):
    with pytest.raises(LlmircError, match="linking junk.so failed"):
        tc.link_shared([b"not an object file"], tmp_path / "junk.so")


def test_the_loader_runs_the_fitting_library_needing_the_most_features(monkeypatch):
    """Of a bundle's CPU libraries, the loader runs the one for this host's architecture whose
    features the host has, the most demanding first whatever the manifest's order; on aarch64
    the features come from AT_HWCAP (so also under qemu-user, whose /proc/cpuinfo is the host's)."""
    from types import SimpleNamespace

    from llmirc.errors import BundleError
    from llmirc.runtime import cpu_executor

    targets = [{"name": n, "kind": "cpu", "arch": a, "features": f, "library": f"kernels/{n}/lib.so"}
               for n, a, f in (("cpu-x86_64-native", "x86_64", ["avx2", "avx512f"]),
                               ("cpu-aarch64-generic", "aarch64", ["asimd"]),
                               ("cpu-aarch64-dotprod", "aarch64", ["asimd", "asimddp"]))]
    bundle = SimpleNamespace(name="b.llmir", manifest={"targets": targets})
    monkeypatch.setattr(cpu_executor.platform, "machine", lambda: "aarch64")
    for flags, want in (({"asimd", "asimddp"}, "cpu-aarch64-dotprod"), ({"asimd"}, "cpu-aarch64-generic")):
        monkeypatch.setattr(cpu_executor, "host_cpu_flags", lambda flags=flags: flags)
        assert cpu_executor.pick_cpu_target(bundle)["name"] == want
    monkeypatch.setattr(cpu_executor, "host_cpu_flags", lambda: {"fp"})
    with pytest.raises(BundleError, match="cpu-x86_64-native is for x86_64; cpu-aarch64-generic needs asimd"):
        cpu_executor.pick_cpu_target(bundle)
    if platform.machine() == "x86_64":  # AT_HWCAP is read on aarch64 only
        monkeypatch.undo()
        assert "asimd" not in cpu_executor.host_cpu_flags()


class _Stopped(BaseException):
    pass


def test_a_stop_while_the_linker_starts_kills_its_process_group(tmp_path, monkeypatch):
    """A SIGTERM landing inside subprocess.Popen once cc runs (seen on a loaded CI host): it is held until Popen
    returns, so cc's process group is killed; the exception left Popen with no pid to kill, and cc's child ran on."""
    import os
    import signal
    import time

    child = tmp_path / "child"
    script = tmp_path / "cc"
    script.write_text(f'#!/bin/sh\nsleep 60 &\necho $! > "{child}"\nwait\n')
    script.chmod(0o755)
    real = subprocess.Popen

    class StoppedWhileStarting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            while not child.exists() or not child.read_text().strip():  # (cc and its child running)
                time.sleep(0.01)
            signal.raise_signal(signal.SIGTERM)

    def stop(signum, frame):
        raise _Stopped()

    monkeypatch.setattr(subprocess, "Popen", StoppedWhileStarting)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(_Stopped):
            tc._run_group([str(script)], dict(os.environ))
    finally:
        signal.signal(signal.SIGTERM, previous)
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "cc's child ran on"
