"""Each pass on the front end's graph: what it rewrites, and the near-misses it must leave alone."""

from __future__ import annotations

import pytest
from xdsl.builder import ImplicitBuilder
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, i32

from llmirc import dialect as L
from llmirc.errors import LlmircError
from llmirc.frontend.decoder import arg_attrs, build_decoder
from llmirc.frontend.hf_config import parse_config
from llmirc.passes.func_args import arg_names, forward_func
from llmirc.passes.pipeline import make_context, parse_passes, print_ir, run_passes

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


def decoder(**overrides) -> ModuleOp:
    return build_decoder(parse_config({**CONFIG, **overrides}), lambda n, s: "float32", lambda n: True)


def apply(module: ModuleOp, spec: str) -> ModuleOp:
    ctx = make_context()
    for p in parse_passes(spec):
        p.apply(ctx, module)
    module.verify()
    return module


def ops(module: ModuleOp, kind) -> list:
    return [op for op in module.walk() if isinstance(op, kind)]


def test_fuse_linears_fuses_qkv_and_gate_up():
    m = apply(decoder(attention_bias=True), "fuse-linears,cse,dce")
    concats = ops(m, L.ConcatOp)
    weights = sorted(len(c.inputs) for c in concats)
    # per layer: qkv weights + qkv biases (3 each), gate/up (2)
    assert weights == [2] * 3 + [3] * 6
    splits = [tuple(s.sizes.get_values()) for s in ops(m, L.SplitOp)]
    assert splits.count((64, 32, 32)) == 3 and splits.count((96, 96)) == 3
    names = [op.weight.data for c in concats for op in (i.owner for i in c.inputs)]
    assert names[:3] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]


def test_fuse_linears_near_misses():
    """Different inputs, a residual operand, or mixed bias presence: no fusion."""
    f = func.FuncOp("forward", ([L.tensor(L.DYN, 8), L.tensor(L.DYN, 8)], [L.tensor(L.DYN, 4)]),
                    arg_attrs=arg_attrs("x", "y"))
    with ImplicitBuilder(f.body) as (x, y):
        def w(name, n=4):
            return L.WeightOp(name, (n, 8)).result
        a = L.LinearOp(x, w("a")).result
        b = L.LinearOp(y, w("b")).result                        # other input
        c = L.LinearOp(x, w("c"), L.WeightOp("c.bias", (4,)).result).result  # has a bias, a does not
        d = L.LinearOp(x, w("d"), None, a).result               # has a residual
        s = L.AddOp(L.AddOp(a, b).result, L.AddOp(c, d).result).result
        func.ReturnOp(s)
    m = apply(ModuleOp([f]), "fuse-linears")
    assert not ops(m, L.ConcatOp)


def test_fuse_residual_add():
    m = apply(decoder(), "fuse-residual-add")
    assert not ops(m, L.AddOp)  # o_proj and down_proj both absorb their residual add
    assert sum(op.residual is not None for op in ops(m, L.LinearOp)) == 2 * 3


def test_fuse_residual_add_keeps_multi_use_linear():
    f = func.FuncOp("forward", ([L.tensor(L.DYN, 8)], [L.tensor(L.DYN, 8)]), arg_attrs=arg_attrs("x"))
    with ImplicitBuilder(f.body) as (x,):
        y = L.LinearOp(x, L.WeightOp("w", (8, 8)).result).result
        func.ReturnOp(L.AddOp(L.AddOp(x, y).result, y).result)  # y has two uses
    m = apply(ModuleOp([f]), "fuse-residual-add")
    assert len(ops(m, L.AddOp)) == 2


def test_prune_logits_moves_gather_above_final_norm_and_last_mlp():
    m = apply(decoder(), "prune-logits,cse,dce")
    f = forward_func(m)
    assert "logits_indices" in arg_names(f)
    gathers = ops(m, L.GatherRowsOp)
    # Gathered: the last attention output and the residual stream entering the last layer's
    # attention add; so o_proj, the last MLP, the final norm and the LM head run on kept rows.
    assert len(gathers) == 2
    lm_head = f.get_return_op().operands[0].owner
    norm = lm_head.input.owner
    assert isinstance(norm, L.RMSNormOp)
    sources = {g.input.owner.name for g in gathers}
    assert sources == {"llmir.attention", "llmir.add"}
    # Idempotent: a second run changes nothing.
    before = print_ir(m)
    assert print_ir(apply(m, "prune-logits")) == before
    # quantize-weights{rotate} before it: the gather moves up through the last layer's
    # llmir.hadamard (row-wise) as through its act_mul
    m = apply(decoder(), "quantize-weights{bits=8 rotate=true},prune-logits,cse,dce")
    assert len(ops(m, L.HadamardOp)) == 6 and {g.input.owner.name for g in ops(m, L.GatherRowsOp)} == \
        {"llmir.attention", "llmir.add"}


def test_paged_kv_rewrites_attention():
    m = apply(decoder(), "paged-kv{block-size=32}")
    assert not ops(m, L.AttentionOp)
    appends, paged = ops(m, L.KVAppendOp), ops(m, L.PagedAttentionOp)
    assert [a.layer.value.data for a in appends] == [0, 1, 2] == [p.layer.value.data for p in paged]
    pool = appends[0].pool.type
    assert isinstance(pool, L.KVPoolType)
    assert (pool.layers.data, pool.kv_heads.data, pool.head_dim.data, pool.block_size.data) == (3, 2, 16, 32)
    # Each layer's attention reads the pool its own kv_append returned (explicit ordering).
    assert all(p.pool is a.result for a, p in zip(appends, paged))
    f = forward_func(m)
    assert arg_names(f)[2:] == ["slot_mapping", "block_tables", "seq_lens", "query_start_loc", "kv_pool"]
    assert f.get_return_op().operands[-1] is appends[-1].result


def test_fuse_rope_kv_append():
    m = apply(decoder(), "paged-kv,fuse-rope-kv-append")
    assert not ops(m, L.RopeOp) and not ops(m, L.KVAppendOp)
    fused, paged = ops(m, L.RopeKVAppendOp), ops(m, L.PagedAttentionOp)
    assert [f.layer.value.data for f in fused] == [0, 1, 2]
    assert all(p.q is f.q_result and p.pool is f.pool_result for f, p in zip(fused, paged))
    assert fused[1].pool is fused[0].pool_result  # the pool still threads through the layers in order
    assert forward_func(m).get_return_op().operands[-1] is fused[-1].pool_result
    assert fused[0].num_heads.value.data == 4 and fused[0].k.type.get_shape()[1] == 2 * 16
    text = print_ir(m)
    assert '"llmir.rope_kv_append"' in text
    m.verify()


def test_fuse_rope_kv_append_near_misses():
    """An int8 pool (its kv_append quantizes runs of tokens), and a rotated k read elsewhere too."""
    m = apply(decoder(), "paged-kv,kv-cache-dtype{dtype=int8},fuse-rope-kv-append")
    assert not ops(m, L.RopeKVAppendOp) and len(ops(m, L.KVAppendOp)) == 3
    m = apply(decoder(), "paged-kv")
    kv = ops(m, L.KVAppendOp)[0]
    kv.parent_block().insert_op_after(L.AddOp(kv.k, kv.k), kv)
    m = apply(m, "fuse-rope-kv-append")
    assert [f.layer.value.data for f in ops(m, L.RopeKVAppendOp)] == [1, 2]


@pytest.mark.parametrize("spec,message", [
    ("fuse-everything", r"unknown pass fuse-everything \(available: "),
    ("paged-kv{block-size=12}", "power of two"),
    ("paged-kv{bogus=1}", "paged-kv"),
])
def test_bad_pipelines(spec, message):
    with pytest.raises(LlmircError, match=message):
        apply(decoder(), spec)


def test_default_pipeline_sliding_window_reaches_paged_attention():
    cfg = {**CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 5}
    m = build_decoder(parse_config(cfg), lambda n, s: "float32", lambda n: True)
    run_passes(m)
    assert {p.sliding_window.value.data for p in ops(m, L.PagedAttentionOp)} == {5}


def test_qwen2_sliding_window_from_max_window_layers():
    cfg = {**CONFIG, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 7,
           "max_window_layers": 2}
    assert parse_config(cfg).sliding_windows == (0, 0, 7)
    assert parse_config({**cfg, "use_sliding_window": False}).sliding_windows == (0, 0, 0)


def test_i32_vectors_in_signature():
    m = decoder()
    run_passes(m)
    f = forward_func(m)
    named = dict(zip(arg_names(f), f.args))
    assert named["token_ids"].type == L.tensor(L.DYN, dtype=i32)
    assert named["block_tables"].type == L.tensor(L.DYN, L.DYN, dtype=i32)


def test_onnx_passes_load_by_their_names_and_only_when_named():
    """The ONNX lowering's passes are registered by name and imported on use (they import onnx,
    ~0.6 s with ml_dtypes): each loads as the class of that name, and a compile's modules leave
    onnx unimported until then."""
    import subprocess
    import sys

    from llmirc.passes import ONNX_PASSES, PASSES

    for name in ONNX_PASSES:
        assert PASSES[name]().name == name
    code = "import sys, llmirc.driver, llmirc.passes.pipeline; print('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
