"""GPU-only fusions of a plan's calls: the GPU targets' own plan (a target entry's `plan`), the
CPU target keeps the manifest's.

A decode step's kernels are small and each costs its launch and ramp (the H200 runs of
2026-12-04: 163 launches a step, about 6.7 us each), so the calls whose output feeds only the
next call, a linear, become one call of a fused kind (kinds.py) whose one-token variant (T <= 1)
is a GEMV computing the prologue inside its loads (linear.py). Off by default
(CompileOptions.gpu_fusions): the first fused kernels, 16-row MMA tiles, were slower on the H200;
these GEMVs have not run on a GPU yet:

    rms_norm(out=S, x=X, w=N); linear(x=S, ...)      ->  rms_norm_linear(x=S, src=X, norm_w=N, ...)
    act_mul(out=S, gate=G, up=U); linear(x=S, ...)   ->  act_mul_linear(x=S, gate=G, up=U, ...)

Larger T keeps the two kernels (launched by the one call), since a norm fused into a prefill
matmul would sum each row's squares once per column tile. Conditions (else the calls stay):
the linear reads exactly the prologue's output (same slot, offset and leading dimension) over
the same rows; the linear's output and residual are not in the prologue's input slots (the
fused kernel reads those while other programs write); and no later call reads S before a call
writes it (with one token the fused call leaves S unwritten).
"""

from __future__ import annotations

from dataclasses import replace

from llmirc.targets.plan import KernelCall, Plan, Ref

from .kinds import signature

PROLOGUES = {"rms_norm": ("rms_norm_linear", "eps", {"src": "x", "ld_src": "ld_x", "norm_w": "w"}),
             "act_mul": ("act_mul_linear", "act", {"gate": "gate", "ld_gate": "ld_gate", "up": "up",
                                                   "ld_up": "ld_up"})}


def fuse_prologues(plan: Plan) -> Plan:
    """The plan with each fusable (prologue, linear) pair as one call; symbols assigned as the
    planner does (one per distinct kind and params), the plan's own calls keeping theirs."""
    calls, out, i = plan.calls, [], 0
    while i < len(calls):
        fused = _fused(calls, i) if i + 1 < len(calls) else None
        out.append(fused or calls[i])
        i += 2 if fused else 1
    symbols = {c.key(): c.symbol for c in calls}
    for c in out:
        if not c.symbol:
            c.symbol = symbols.setdefault(c.key(), f"llmir_{c.kind}_{len(symbols)}")
    return replace(plan, calls=out)


def _slot(a) -> int | None:
    return a.index if isinstance(a, Ref) and a.space == "ws" else None


def _fused(calls: list[KernelCall], i: int) -> KernelCall | None:
    pro, lin = calls[i], calls[i + 1]
    if pro.kind not in PROLOGUES or lin.kind != "linear" or int(pro.params.get("heads", 1)) != 1:
        return None
    kind, param, inputs = PROLOGUES[pro.kind]
    s = pro.args["out"]
    if _slot(s) is None or lin.args["x"] != s or lin.args["ld_x"] != pro.args["ld_out"] \
            or lin.args["T"] != pro.args["T"] or int(pro.params["dim"]) != int(lin.params["k"]):
        return None
    read = {_slot(pro.args[name]) for name in inputs.values()} - {None}
    if {_slot(lin.args["out"]), _slot(lin.args["residual"])} & read or not _dead_after(calls, i + 2, s.index):
        return None
    args = {}
    for p in signature(kind).params:
        args[p.name] = pro.args[inputs[p.name]] if p.name in inputs else lin.args[p.name]
    params = dict(lin.params) | {param: pro.params[param]}
    return KernelCall(kind, signature(kind).bind_static(params), args)


def _dead_after(calls: list[KernelCall], start: int, slot: int) -> bool:
    """Whether workspace slot `slot` is written before any call from `start` on reads it."""
    for c in calls[start:]:
        access = {p.name: p.access for p in signature(c.kind).params if p.type == "ptr"}
        touching = [access[name] for name, a in c.args.items() if name in access and _slot(a) == slot]
        if any("r" in acc for acc in touching):
            return False
        if touching:
            return True
    return True
