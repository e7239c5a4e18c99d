"""The llmir dialect: verifiers, and the generic textual form in upstream MLIR and back in xDSL."""

from __future__ import annotations

import pytest
from xdsl.parser import Parser
from xdsl.utils.exceptions import VerifyException

from llmirc import dialect as L
from llmirc.frontend.decoder import build_decoder
from llmirc.frontend.hf_config import parse_config
from llmirc.passes.pipeline import make_context, print_ir, required, run_passes

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def optimized_ir(tail: str | None = None, config: dict = CONFIG) -> str:
    module = build_decoder(parse_config(config), lambda n, s: "float32", lambda n: True)
    run_passes(module, tail=tail)
    return print_ir(module)


# quantized weights (the embedding too: tied, it is also the LM head, which stays float), down_proj's input
# rotated, and an int8 KV cache
QUANTIZED = required(kv_cache_dtype="int8", quantize="quantize-weights{bits=4 keep=lm_head rotate=true}")


def check_round_trip(text: str) -> None:
    """`text` parses and verifies in upstream MLIR, and prints back as itself from xDSL."""
    from iree.compiler import ir
    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        assert ir.Module.parse(text).operation.verify()
    module = Parser(make_context(), text).parse_module()
    module.verify()
    assert print_ir(module) == text


def test_fp8_kv_pool_parses_in_upstream_mlir_and_round_trips():
    text = optimized_ir(required(kv_cache_dtype="fp8"))
    assert "block_size = 16, f8E4M3FN>" in text
    check_round_trip(text)


def test_quantized_ir_parses_in_upstream_mlir_and_round_trips():
    from iree.compiler import ir
    text = optimized_ir(QUANTIZED)
    assert "tensor<100x64x!llmir.quant<bits = 4, group_size = 32, scale = f16, zero = none>>" in text
    assert text.count('"llmir.hadamard"') == 4  # per layer: down_proj's input and weight, in blocks of 32
    assert '"llmir.hadamard"(%' in text and "<{block = 32 : i64}> : (tensor<?x96xf32>) -> tensor<?x96xf32>" in text
    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(text)
        assert module.operation.verify()
        assert "llmir.quantize" in str(module)
    module = Parser(make_context(), text).parse_module()
    module.verify()
    assert print_ir(module) == text


def test_value_table_quant_type_round_trips():
    """A quantized type with a value table (GGUF's IQ4) prints its table, parses back in xDSL and in
    upstream MLIR, and a table the kernels cannot look up is refused."""
    from xdsl.dialects.builtin import ModuleOp, f32

    table = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
    qtype = L.QuantType(4, 32, f32, "none", values=table)
    text = print_ir(ModuleOp([L.PackedWeightOp("w", "gguf", (8, 64), qtype)]))
    assert "!llmir.quant<bits = 4, group_size = 32, scale = f32, zero = none, values = [-127, -104, " in text
    check_round_trip(text)
    assert Parser(make_context(), text).parse_module().body.block.first_op.result.type.element_type.table == table
    for bits, zero, values, message in ((8, "none", table, "4-bit symmetric codes only"),
                                        (4, "min", table, "4-bit symmetric codes only"),
                                        (4, "none", table[:8], "16 ints in")):
        with pytest.raises(VerifyException, match=message):
            L.QuantType(bits, 32, f32, zero, values=values)


def test_two_level_quant_type_round_trips():
    """Two-level scales (GGUF's K-quants: i8 sub-scales under a float16 per super_group) print the
    super-group, parse back in xDSL and in upstream MLIR, and other combinations are refused."""
    from xdsl.dialects.builtin import ModuleOp, f16, i8

    qtype = L.QuantType(4, 32, i8, "min", super_group=256)
    text = print_ir(ModuleOp([L.PackedWeightOp("w", "gguf", (8, 512), qtype)]))
    assert "!llmir.quant<bits = 4, group_size = 32, scale = i8, zero = min, super_group = 256>" in text
    check_round_trip(text)
    assert Parser(make_context(), text).parse_module().body.block.first_op.result.type.element_type == qtype
    for scale, zero, sg, message in ((f16, "min", 256, "take i8 sub-scales"), (i8, "min", 0, "i8 with super_group"),
                                     (i8, "int", 256, "uint8 zero points"), (i8, "none", 48, "a power of two")):
        with pytest.raises(VerifyException, match=message):
            L.QuantType(4, 32, scale, zero, super_group=sg)


def test_optimized_ir_parses_and_verifies_in_upstream_mlir():
    from iree.compiler import ir
    text = optimized_ir()
    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(text)
        assert module.operation.verify()
        printed = str(module)
    assert "llmir.paged_attention" in printed and "!llmir.kv_pool<" in printed


def test_optimized_ir_round_trips_through_xdsl():
    text = optimized_ir()
    module = Parser(make_context(), text).parse_module()
    module.verify()
    assert print_ir(module) == text
    run_passes(module)  # the pipeline reruns from saved IR and is then a fixed point
    assert print_ir(module) == text


def test_qwen3_head_norms_round_trip():
    """Qwen3's q_norm / k_norm: rms_norm with num_heads, in upstream MLIR and back in xDSL."""
    text = optimized_ir(config=dict(CONFIG, architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert text.count("<{eps = 1.000000e-06 : f32, num_heads = 4 : i64}> : (tensor<?x128xf32>, tensor<32xf32>)") \
        == 2 and text.count("num_heads = 2 : i64}> : (tensor<?x64xf32>, tensor<32xf32>)") == 2, text
    check_round_trip(text)


def test_verifiers_reject_bad_shapes():
    x = L.WeightOp("x", (3, 8)).result
    with pytest.raises(VerifyException, match="features"):
        L.LinearOp(x, L.WeightOp("w", (4, 9)).result).verify()
    with pytest.raises(VerifyException, match="rms_norm weight"):
        L.RMSNormOp(x, L.WeightOp("n", (7,)).result, 1e-5).verify()
    with pytest.raises(VerifyException, match=r"rms_norm weight must be \[4\]"):
        L.RMSNormOp(x, L.WeightOp("n", (8,)).result, 1e-5, num_heads=2).verify()
    with pytest.raises(VerifyException, match="num_heads 3 does not divide"):
        L.RMSNormOp(x, L.WeightOp("n", (8,)).result, 1e-5, num_heads=3).verify()
    q, kv = L.WeightOp("q", (3, 64)).result, L.WeightOp("k", (3, 32)).result
    with pytest.raises(VerifyException, match="not divisible"):
        L.AttentionOp(q, kv, kv, num_heads=4, num_kv_heads=3, head_dim=16, scale=0.25).verify()
    with pytest.raises(VerifyException, match="rotary dim"):
        L.RopeOp(q, L.WeightOp("p", (3,)).result, 4, 16, [1.0] * 9).verify()
    with pytest.raises(VerifyException, match="do not add up"):
        L.SplitOp(q, [32, 16]).verify()
    for block in (0, 1, 12, 16):  # not a power of two >= 2, or not dividing 8 columns
        with pytest.raises(VerifyException, match="hadamard: block"):
            L.HadamardOp(x, block).verify()
    L.HadamardOp(x, 8).verify()
