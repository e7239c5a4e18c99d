"""Run a launch rule through Triton's own launcher: the interpreter (TRITON_INTERPRET=1, torch CPU
tensors) in the tests, or Triton's JIT on a GPU host. The bundle's loader does not use this: it
launches the AOT binaries through the driver with the same rule (llmirc.runtime.launch_rules).

`args` maps every argument name of the rule's call to a torch tensor (pointer arguments; the
dtype must be the argument's) or an int/float; the rule's extra buffers are allocated here,
zero-filled, unless given.
"""

from __future__ import annotations

from llmirc.runtime import launch_rules

from .spec import Rule

_TORCH_DTYPES = {"*fp32": "float32", "*bf16": "bfloat16", "*fp16": "float16", "*i32": "int32", "*i8": "int8",
                 "*i64": "int64"}


def allocate_buffers(rule: Rule, env: dict, device) -> dict:
    """The rule's extra buffers, zero-filled torch tensors of their declared element type."""
    import torch
    out = {}
    sizes = launch_rules.buffer_bytes(rule.to_json(), env)
    for buf in rule.buffers:
        dtype = getattr(torch, _TORCH_DTYPES[buf["type"]])
        itemsize = torch.empty((), dtype=dtype).element_size()
        out[buf["name"]] = torch.zeros(max(1, -(-sizes[buf["name"]] // itemsize)), dtype=dtype, device=device)
    return out


def run(rule: Rule, args: dict) -> None:
    """Launches the rule's kernels for the call's arguments (as the loader would choose them)."""
    rj = rule.to_json()
    missing = [a for a, _ in rule.args if a not in args]
    if missing:
        raise ValueError(f"{rule.kind}: arguments missing: {missing}")
    env = launch_rules.env_of(rj, args)
    device = next(v.device for v in args.values() if hasattr(v, "device"))
    args = allocate_buffers(rule, env, device) | dict(args)
    kernels = rule.kernels()
    for launch in launch_rules.select(rj, env):
        spec = kernels[launch["kernel"]]
        grid = launch_rules.grid(launch, env)
        if 0 in grid:
            continue
        values = args | launch_rules.scalars(launch, env)
        spec.fn[grid](*(values[a] for a, _ in spec.args), **dict(spec.constexprs),
                      num_warps=spec.num_warps, num_stages=spec.num_stages)
