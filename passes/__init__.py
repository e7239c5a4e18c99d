"""The optimization passes, by the names used in textual pipelines (`--passes`)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from xdsl.passes import ModulePass
from xdsl.transforms.canonicalize import CanonicalizePass
from xdsl.transforms.common_subexpression_elimination import CommonSubexpressionElimination
from xdsl.transforms.dead_code_elimination import DeadCodeElimination

from .cast_weights import CastWeights
from .fuse_linears import FuseLinears
from .fuse_residual_add import FuseResidualAdd
from .fuse_rope_kv_append import FuseRopeKVAppend
from .kv_cache_dtype import KVCacheDtype
from .paged_kv import PagedKV
from .prune_logits import PruneLogits
from .quantize_weights import QuantizeWeights
from .smooth import Smooth

# The ONNX lowering's passes (the pipeline an ONNX source starts with) import onnx, and onnx imports
# ml_dtypes (~0.6 s): they are imported when a pipeline names them. name -> (module, class).
ONNX_PASSES = {"onnx-fuse-embedding": ("onnx_fuse_embedding", "FuseEmbedding"),
               "onnx-fuse-linear": ("onnx_fuse_linear", "FuseLinear"), "onnx-glue": ("onnx_to_llmir", "OnnxGlue"),
               "onnx-fuse-norm": ("onnx_fuse_norm", "FuseNorm"),
               "onnx-fuse-activation": ("onnx_fuse_activation", "FuseActivation"),
               "onnx-fuse-attention": ("onnx_fuse_attention", "FuseAttention"),
               "onnx-to-llmir": ("onnx_to_llmir", "OnnxToLlmir")}


def _onnx_pass(name: str) -> type[ModulePass]:
    module, cls = ONNX_PASSES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


# name -> a function giving the pass's class (xDSL's PassPipeline.parse_spec takes these)
PASSES: dict[str, Callable[[], type[ModulePass]]] = {p.name: (lambda p=p: p) for p in (
    CanonicalizePass, CommonSubexpressionElimination, DeadCodeElimination,
    FuseLinears, FuseResidualAdd, FuseRopeKVAppend, PruneLogits, PagedKV, Smooth, QuantizeWeights, CastWeights, KVCacheDtype,
)} | {name: functools.partial(_onnx_pass, name) for name in ONNX_PASSES}
