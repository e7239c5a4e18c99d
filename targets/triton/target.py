"""The cuda and hip backends: plan -> launch rules -> Triton kernels compiled per architecture.

Stages, in order, each kept on request (`--keep-intermediates`): cuda `ttir`, `ttgir`, `llir`,
`ptx`, `cubin`; hip `ttir`, `ttgir`, `llir`, `amdgcn`, `hsaco`. Every plan kernel (a kind with
static params) gets the launch rule of its kind for each architecture (kinds.py), compiled with
the divisibility hints its calls allow (`aligned_args`); the sampling kernels (`argmax`,
`sample` over the logits) come along so that a decode step can copy back token ids, and
`advance_step`, which feeds a step's tokens to the next within a multi-step decode run. Identical
kernels compile once (compile.py's cache, keyed by source and options), in parallel.

The backend compiles its own plan, stored in its entry as `plan`: the manifest's, with the
GPU-only fusions when CompileOptions.gpu_fusions asks for them (fuse.py: a norm or act_mul and
the linear reading it as one call). One manifest
entry per architecture (`kind` cuda or hip) carries, per plan kernel symbol, its launch rule
(the JSON llmirc.runtime.launch_rules evaluates) and, per compiled kernel, its binary and
launch metadata (symbol, warps, shared memory, parameters). PTX that a newer GPU's
driver can JIT-compile (sm_80's, not sm_90a's) is always stored.

Full-sequence (generic-kernel) models stay CPU-only: `check` refuses them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace

from llmirc import dtypes
from llmirc.artifact_format.writer import BundleWriter
from llmirc.errors import LlmircError, UsageError
from llmirc.targets.plan import ABI_VERSION, Plan, Ref

from .arch import ARCHS, get_arch
from .compile import BINARY, STAGES, compile_kernels, default_cache_dir
from .fuse import fuse_prologues
from .kinds import BUILDERS, KV_STORAGE, launch_rule

DEFAULT_ARCHS = {"cuda": ("sm_80", "sm_90"), "hip": ("gfx90a", "gfx942")}
SAMPLING = ("argmax", "sample", "advance_step")  # kinds the executor runs outside the plan
TEXT_STAGES = {"cuda": STAGES["cuda"][:-1], "hip": STAGES["hip"][:-1]}


def aligned_args(plan: Plan, symbol: str) -> set[str]:
    """The arguments of kernel `symbol` that are multiples of 16 in every call of it: pointers
    whose byte offset into their buffer is (buffers start 256-byte aligned on the device: see
    llmirc.runtime.gpu_memory), integer constants such as ld_* that are. Run-time dims (T, B, ...)
    never are."""
    out = None
    for call in plan.calls:
        if call.symbol != symbol:
            continue
        ok = set()
        for name, a in call.args.items():
            if isinstance(a, Ref):
                itemsize = dtypes.dtype(plan.dtype_of(a)).itemsize if a.space != "null" else 0
                if (a.col * itemsize) % 16 == 0:
                    ok.add(name)
            elif isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0:
                ok.add(name)
        out = ok if out is None else out & ok
    return out or set()


class TritonBackend:
    """A GPU backend (cuda or hip); `--arch` picks the architectures of this backend's kind."""

    kind: str = ""

    def __init__(self, options):
        given = list(options.archs or ())
        mine = [a for a in given if get_arch(a).backend == self.kind]  # unknown names fail here
        self.archs_given = bool(options.archs)
        self.archs = tuple(dict.fromkeys(mine)) if options.archs else DEFAULT_ARCHS[self.kind]
        if not self.archs:
            raise UsageError(f"--arch {','.join(given)}: no {self.kind} architecture given "
                             f"(known: {', '.join(a for a, x in ARCHS.items() if x.backend == self.kind)})")
        self.stages, self.text_stages = STAGES[self.kind], TEXT_STAGES[self.kind]
        self.keep_intermediates = options.keep_intermediates
        self.cache_dir = default_cache_dir()
        self.jobs = options.jobs
        self.fusions = options.gpu_fusions
        self.pdl = options.gpu_pdl
        if dtypes.kv_cache_dtype_name(options.kv_cache_dtype) == dtypes.FP8_E4M3.name:  # (the flag: before reading)
            self._check_fp8()

    def plan(self, plan: Plan) -> Plan:
        """This backend's own plan: the manifest's, with the GPU-only fusions (fuse.py) when
        CompileOptions.gpu_fusions asks for them (off by default, DESIGN.md)."""
        return fuse_prologues(plan) if self.fusions else plan

    def check(self, plan: Plan) -> None:
        if plan.full_sequence:
            raise LlmircError(f"target {self.kind}: this is a full-sequence model (ONNX ops left generic), which "
                              "only the cpu target runs; compile it with --target cpu")
        missing = sorted({c.kind for c in plan.calls} - set(BUILDERS))
        if missing:
            raise LlmircError(f"target {self.kind}: no GPU kernel for {', '.join(missing)}; compile with --target cpu")
        if plan.pool.dtype not in KV_STORAGE:
            raise LlmircError(f"target {self.kind}: no GPU kernel for an {plan.pool.dtype} KV cache (the GPU kernels take "
                              f"{', '.join(KV_STORAGE)}); give --kv-cache-dtype auto or compile with --target cpu")
        if plan.pool.dtype == dtypes.FP8_E4M3.name:  # (a kv-cache-dtype pass in --passes)
            self._check_fp8()
        plan = self.plan(plan)
        for arch in self.archs:  # the kernels' own limits (head_dim, block shapes), before anything is compiled
            try:
                self.rules(plan, arch)
            except ValueError as e:
                raise LlmircError(f"target {self.kind} ({arch}): {e}") from None

    def _check_fp8(self) -> None:
        """An fp8 (E4M3) KV cache needs its conversions on every architecture asked for."""
        lacking = [a for a in self.archs if not get_arch(a).has_fp8_e4m3]
        if lacking:
            default = "" if self.archs_given else f"; {','.join(self.archs)} is the default --arch"
            why, hint = ((f"FP8 E4M3 conversions need sm_89 or newer{default}", "--arch sm_90") if self.kind == "cuda"
                         else ("gfx90a has no FP8, gfx942's is the FNUZ kind", "--kv-cache-dtype int8"))
            raise UsageError(f"target {self.kind}: no fp8 KV cache on {', '.join(lacking)} ({why}); give {hint}")

    def rules(self, plan: Plan, arch: str) -> dict:
        """{symbol: Rule} of every plan kernel and of the sampling kinds, for one architecture (with
        programmatic dependent launch where CompileOptions.gpu_pdl asks for it and it has it: pdl.py)."""
        a = get_arch(arch)
        if self.pdl and a.has_pdl:
            a = replace(a, pdl=True)
        out = {}
        for symbol, call in plan.kernels().items():
            rule = launch_rule(call.kind, call.params, a)
            out[symbol] = rule.with_aligned(aligned_args(plan, symbol) | {b["name"] for b in rule.buffers})
            out[symbol].check()
        for kind in ("argmax", "sample"):  # tokens, logits (aligned: device buffers); ld_logits = vocab
            aligned = {"tokens", "logits", "temperature", "top_k", "top_p", "seeds", "offsets"}
            if plan.logits_cols % 16 == 0:
                aligned.add("ld_logits")
            out[kind] = launch_rule(kind, {"vocab": plan.logits_cols}, a, aligned=aligned)
        out["advance_step"] = launch_rule("advance_step", {"block_size": plan.pool.block_size}, a)
        return out

    def _compile(self, plan: Plan, archs, warn: Callable[[str], None]) -> dict:
        """{arch: (rules, {spec key: Compiled})}, every kernel of every arch compiled in one batch;
        `warn`: told when the kernel cache cannot be written."""
        rules = {arch: self.rules(plan, arch) for arch in archs}
        pairs = {(key, arch): spec for arch in archs for r in rules[arch].values() for key, spec in r.kernels().items()}
        results = compile_kernels([(spec, arch) for (_, arch), spec in pairs.items()], cache_dir=self.cache_dir,
                                  jobs=self.jobs, warn=warn)
        compiled = {arch: {} for arch in archs}
        for (key, arch), res in zip(pairs, results):
            compiled[arch][key] = res
        return {arch: (rules[arch], compiled[arch]) for arch in archs}

    def emit(self, plan: Plan, stage: str) -> str:
        """One text stage of every kernel for this backend's first architecture: a module per kernel,
        each after a comment naming it; the MLIR stages' modules apart by `// -----`, as
        mlir-opt's and triton-opt's --split-input-file read them (one file of them does not parse:
        each module defines its own #loc aliases)."""
        arch = self.archs[0]
        rules, compiled = self._compile(self.plan(plan), [arch], lambda m: print(f"note: {m}", file=sys.stderr))[arch]
        comment = ";" if stage in ("llir", "amdgcn") else "//"
        parts = []
        for symbol, rule in rules.items():
            for key in rule.kernels():
                parts.append(f"{comment} {symbol} ({rule.kind}): {compiled[key].kernel} {key} for {arch}\n"
                             f"{compiled[key].asm[stage]}")
        return ("\n// -----\n" if stage in ("ttir", "ttgir") else "\n").join(parts)

    def build(self, plan: Plan, bundle: BundleWriter, progress: Callable[[str], None]) -> list[dict]:
        """Compiles every kernel for each architecture into `kernels/<kind>-<arch>/`; returns one
        manifest entry per architecture."""
        progress(f"{self.kind}: compiling Triton kernels for {', '.join(self.archs)}")
        plan = self.plan(plan)
        done = self._compile(plan, self.archs, getattr(progress, "note", progress))
        entries = []
        for arch in self.archs:
            rules, compiled = done[arch]
            a = get_arch(arch)
            name = f"{self.kind}-{arch}"
            binaries, times, spent, fresh = {}, {}, {}, 0
            for key, c in compiled.items():
                stem = f"kernels/{name}/{c.kernel}_{key}"
                binary = f"{stem}.{BINARY[self.kind]}"
                bundle.write_bytes(binary, c.binary)
                entry = {"kernel": c.kernel, "binary": binary, **c.metadata}
                portable = self.kind == "cuda" and not c.metadata["ptx_target"].endswith("a")
                if portable or self.keep_intermediates:  # PTX a newer GPU's driver can JIT-compile
                    if "ptx" in c.asm:
                        bundle.write_text(f"{stem}.ptx", c.asm["ptx"])
                        entry["ptx"] = f"{stem}.ptx"
                if self.keep_intermediates:
                    for stage, text in c.asm.items():
                        if stage != "ptx":
                            bundle.write_text(f"{stem}.{stage}", text)
                binaries[key] = entry
                fresh += not c.cached
                for stage, seconds in c.times.items():  # (a cached kernel's: when it was compiled)
                    times[stage] = times.get(stage, 0.0) + seconds
                    if not c.cached:
                        spent[stage] = spent.get(stage, 0.0) + seconds
            progress(f"{name}: {len(compiled)} kernels ({len(compiled) - fresh} from the cache); compile time "
                     + (", ".join(f"{s} {t:.1f}s" for s, t in spent.items()) or "0s"))
            entries.append({
                "name": name, "kind": self.kind, "arch": arch, "target": {"backend": a.backend, "arch": a.arch,
                                                                           "warp_size": a.warp_size},
                "abi_version": ABI_VERSION,
                # every kernel has PTX that a newer GPU's driver can JIT-compile
                "ptx_portable": self.kind == "cuda" and all(not b["ptx_target"].endswith("a") for b in binaries.values()),
                "kernels": [{"symbol": s, "kind": c.kind, "params": c.params, "rule": rules[s].to_json()}
                            for s, c in plan.kernels().items()],
                "plan": plan.to_json(),  # the manifest's plan with the GPU-only fusions (fuse.py)
                "sampling": {k: rules[k].to_json() for k in SAMPLING},
                # workspace slots: dtype and byte offset (coefficients of T, L, TT, const; plan.slot_offset)
                # index limits the loader checks each step against (llmirc/runtime/step_check.py)
                "limits": {"logits_cols": plan.logits_cols, **plan.limits},
                "weights": [[w.dtype, list(w.shape)] for w in plan.weights],  # what the kernels were built for
                "slots": [{"dtype": s.dtype, "offset": plan.slot_offset(i)} for i, s in enumerate(plan.slots)],
                "binaries": binaries,
                # how long each stage took: not with SOURCE_DATE_EPOCH (reproducible builds: a cold
                # kernel cache measures other times, and the manifest's bytes would differ)
                **({} if "SOURCE_DATE_EPOCH" in os.environ else
                   {"compile_seconds": {s: round(t, 3) for s, t in times.items()}}),
            })
        return entries


class CudaBackend(TritonBackend):
    kind = "cuda"


class HipBackend(TritonBackend):
    kind = "hip"
