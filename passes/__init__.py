"""The optimization passes, by the names used in textual pipelines (`--passes`)."""

from __future__ import annotations

from xdsl.passes import ModulePass
from xdsl.transforms.canonicalize import CanonicalizePass
from xdsl.transforms.common_subexpression_elimination import CommonSubexpressionElimination
from xdsl.transforms.dead_code_elimination import DeadCodeElimination

from .cast_weights import CastWeights
from .fuse_linears import FuseLinears
from .fuse_residual_add import FuseResidualAdd
from .fuse_rope_kv_append import FuseRopeKVAppend
from .onnx_fuse_activation import FuseActivation
from .onnx_fuse_attention import FuseAttention
from .onnx_fuse_embedding import FuseEmbedding
from .onnx_fuse_linear import FuseLinear
from .onnx_fuse_norm import FuseNorm
from .onnx_to_llmir import OnnxGlue, OnnxToLlmir
from .kv_cache_dtype import KVCacheDtype
from .paged_kv import PagedKV
from .prune_logits import PruneLogits
from .quantize_weights import QuantizeWeights
from .smooth import Smooth

PASSES: dict[str, type[ModulePass]] = {p.name: p for p in (
    CanonicalizePass, CommonSubexpressionElimination, DeadCodeElimination,
    FuseLinears, FuseResidualAdd, FuseRopeKVAppend, PruneLogits, PagedKV, Smooth, QuantizeWeights, CastWeights, KVCacheDtype,
    FuseEmbedding, FuseLinear, OnnxGlue, FuseNorm, FuseActivation, FuseAttention, OnnxToLlmir,
)}
