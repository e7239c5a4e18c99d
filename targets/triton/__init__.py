"""GPU targets (cuda, hip): Triton kernels for every llmir kernel kind, compiled ahead of time.

kinds.py        kind -> static params -> launch rule (kinds' kernels: elementwise.py, norm.py,
                linear.py, rope.py, attention.py, sampling.py)
spec.py         kernel specializations and launch rules (JSON for the loader)
arch.py         the architectures: sm_80, sm_90, gfx90a, gfx942
compile.py      AOT: kernel -> ttir, ttgir, llir, ptx/amdgcn, cubin/hsaco + launch metadata
run.py          run a rule through Triton's own launcher (interpreter in tests, JIT on a GPU)

Imported as llmirc.targets.triton; `import triton` inside it is the Triton package.
"""
