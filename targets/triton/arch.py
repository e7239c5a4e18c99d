"""GPU architectures the Triton kernels are compiled for, with the facts their launch rules use.

`num_sms` is the multiprocessor (CU) count of the reference part of each architecture; launch
rules size split counts from it (more SMs on the host only means some idle ones; fewer, an
extra wave). `max_shared` is the shared memory (LDS) one program may use, in bytes: the
compiler refuses a kernel that needs more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str            # sm_80, sm_90, gfx90a, gfx942: what --arch says
    backend: str         # "cuda" | "hip" (Triton's backend names)
    arch: int | str      # Triton's GPUTarget arch: 80, 90, "gfx90a", ...
    warp_size: int
    num_sms: int
    max_shared: int
    reference: str       # the part num_sms and max_shared describe
    pdl: bool = False    # kernels launched with programmatic dependent launch (pdl.py; has_pdl,
                         # CompileOptions.gpu_pdl): a choice of the compile, not of the part

    @property
    def has_fp8_e4m3(self) -> bool:
        """Converts to and from OCP FP8 E4M3 (float8_e4m3fn): sm_89 and newer. gfx942's FP8 is
        the FNUZ variant (another bias, no infinities, max 240), which Triton spells otherwise."""
        return self.backend == "cuda" and int(self.arch) >= 89

    @property
    def has_pdl(self) -> bool:
        """Programmatic dependent launch (PTX griddepcontrol): sm_90 and newer."""
        return self.backend == "cuda" and int(self.arch) >= 90

    def gpu_target(self):
        """triton.backends.compiler.GPUTarget for this architecture (never the active driver's)."""
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.backend, self.arch, self.warp_size)


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("sm_80", "cuda", 80, 32, 108, 166912, "A100 SXM (163 KB opt-in shared memory)"),
    Arch("sm_90", "cuda", 90, 32, 132, 232448, "H100/H200 SXM (227 KB opt-in shared memory)"),
    Arch("gfx90a", "hip", "gfx90a", 64, 104, 65536, "MI210 (64 KB LDS)"),
    Arch("gfx942", "hip", "gfx942", 64, 304, 65536, "MI300X (64 KB LDS)"),
)}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        from llmirc.errors import UsageError
        hint = "; other NVIDIA GPUs run sm_80's or sm_90's PTX, which the driver compiles for them" \
            if name.startswith(("sm_", "compute_")) else ""
        raise UsageError(f"unknown GPU architecture {name!r} (known: {', '.join(ARCHS)}{hint})") from None
