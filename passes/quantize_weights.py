"""quantize-weights: store the weights of linear (and embedding) ops as integer codes with scales.

`llmirc compile --quant int8|int4` runs it (in a `--passes` pipeline it needs `bits`). Each chosen
weight gets an `llmir.quantize` op whose result type says the scheme; the bundle writer folds
it (round to nearest, llmirc/quant.py) and the kernels read the codes directly (activations
are quantized to int8 on the fly, per block of 32 values).

Options: `bits` 8 or 4; `group-size` (0: one group per output row for 8 bits, 32 for 4 bits;
else 16..512, a power of two); `symmetric` (true: w = s (u - 2^(bits-1)); false: a uint8 zero
point per group); `scale-dtype` (auto: float16 for groups, float32 per output row); `keep`: what
stays in higher precision: `embedding` (embedding tables, the default), `lm_head` (the linear
producing the logits) and glob patterns over checkpoint tensor names (quoted:
`keep="*.down_proj.*",lm_head`), or `none` (alone); the first item that names a weight
decides. An item ending in `=int8` keeps those weights in 8 bits per output row instead of
float, as an LM head of bits=8 is stored (symmetric, float32 scales, whatever `symmetric` and
`scale-dtype` say: a table and the LM head tied to it share one copy), e.g.
`keep=embedding,"*.down_proj.*=int8"`: a mix like llama.cpp's Q4_K_M, which stores half of
ffn_down and attn_v at 6 bits. An LM head not kept is stored with `lm-head-bits`:
8 in 8 bits per output row whatever `bits` is, 6 in symmetric 6-bit groups of 32 with float16
scales (the size of llama.cpp's Q6_K), 4 in 4-bit groups (`group-size`, else 32; as
onnxruntime-genai's int4 models store it); 0 (the default) is 6 for bits=4 and 8 for bits=8, as
llama.cpp stores the output matrix of its Q4 files in Q6_K and of its Q8_0 files in Q8_0 (at 4
bits it costs the most quality: BENCHMARKS.md, "A 6-bit LM head"), and 8 for a head tied to an
embedding table kept `=int8` (one copy). The table a head is tied to, where the `embedding` item
(without `=`) names it and no item keeps the head, is stored as the head (one copy: llama.cpp
quantizes a tied token_embd with its output matrix's type; Gemma's 262k x 640 table is 63% of
Gemma 3 270M's weights); kept `embedding=float`, head and table stay float (one copy); a head
stored in another type than its table (quantized in another scheme, or
kept in float by a `keep` item beside a quantized table, or quantized beside a float one) is a
second copy (said in the report). --report counts the LM head apart (`LM
head -> int8`, `LM head kept`, `LM head tied to a kept embedding table`) and names the item
that kept each other weight (`float (keep embedding)`, `weight -> int8 (keep
*.down_proj.*=int8)`), so `inspect` says how each is stored. A weight whose input size does
not split into the groups gets the largest smaller power-of-two group that does (576 inputs,
group-size 128: groups of 64; llama.cpp falls back to another type for such rows), down to 16;
else it stays as it is (both counted in --report).

`method`: rtn (round to nearest, the default), gptq or autoround. gptq: each linear weight is quantized by GPTQ
(llmirc/quant.py `gptq`) with the Hessian of its input that calibration collected
(llmirc/calibration.py: `llmirc compile --quant-method gptq --calibration FILE`); the Hessian
is an `llmir.weight` operand of the quantize op, so the IR shows which weights it serves; for an
input the smooth pass divided by s, it goes through two `llmir.scale` ops (diag(1/s) H diag(1/s)).
Embedding tables have no input to calibrate and stay round-to-nearest, except a table tied to
an LM head quantized in the same type: it shares the head's GPTQ codes (one copy).
`method` autoround (`--quant-method autoround`): the calibration learned each decoder linear's
codes (llmirc/autoround.py); its weight becomes `llmir.packed_weight` ops of format `learned`
(concatenated as fuse-linears concatenated the weights; in the rotated basis already, so only
the input is rotated), and linears without learned codes (an LM head) get GPTQ as above.

`rotate` (`llmirc compile --quant-rotate`): before quantizing a linear that reads an MLP's
activation (act_mul or act: down_proj, GPT-2's c_proj), its input x becomes llmir.hadamard(x)
(a kernel: blocks of `rotation_block`, 128 where they divide the inputs) and its weight
hadamard(w) (folded at compile time), which is the same linear in exact arithmetic. The
intermediate activations of an MLP have a few channels far larger than the rest; in the
rotated basis each block's weights hold less of them, and GPTQ compensates the rounding
better (QuaRot's online Hadamard before down_proj, Ashkboos et al. 2024; DESIGN.md,
"Rotation"). With GPTQ the Hessian goes through the same rotation (R H R: hadamard, transpose,
hadamard). Quantized checkpoints' own weights are not rotated.

Before:  %a = "llmir.act_mul"(%g, %u)   %y = "llmir.linear"(%a, %w)
After (rotate=true):
         %a = "llmir.act_mul"(%g, %u)   %r = "llmir.hadamard"(%a) <{block = 128}>
         %wr = "llmir.hadamard"(%w) <{block = 128}>   %q = "llmir.quantize"(%wr)   %y = "llmir.linear"(%r, %q)

Before:  %w = "llmir.weight"() {weight = "...q_proj.weight"} : () -> tensor<64x64xf32>
         %y = "llmir.linear"(%x, %w) : (tensor<?x64xf32>, tensor<64x64xf32>) -> tensor<?x64xf32>
After (bits=4):
         %q = "llmir.quantize"(%w) : (tensor<64x64xf32>) -> tensor<64x64x!llmir.quant<bits = 4, group_size = 32,
                                                                   scale = f16, zero = none>>
         %y = "llmir.linear"(%x, %q) : (tensor<?x64xf32>, tensor<64x64x!llmir.quant<...>>) -> tensor<?x64xf32>
After (bits=4 method=gptq):
         %h = "llmir.weight"() {weight = "calibration.hessian.0"} : () -> tensor<64x64xf32>
         %q = "llmir.quantize"(%w, %h) : (tensor<64x64xf32>, tensor<64x64xf32>) -> tensor<64x64x!llmir.quant<...>>
After (bits=4 method=autoround):
         %q = "llmir.packed_weight"() <{format = "learned", weight = "...q_proj.weight"}> : () -> tensor<64x64x!llmir.quant<...>>
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass

from llmirc import dialect as L
from llmirc import dtypes
from llmirc.errors import LlmircError, UsageError
from llmirc.quant import Scheme

from .cast_weights import float_type, replace_weight, weight_uses
from .func_args import forward_func
from .report import note


def source_names(v: SSAValue) -> list[str]:
    """The checkpoint tensors a weight value is made of (through concat, transpose, cast, scale)."""
    op = v.owner
    if isinstance(op, (L.WeightOp, L.PackedWeightOp)):
        return [op.weight.data]
    if isinstance(op, L.ScaleOp):  # its scale is the compiler's (smooth), not the checkpoint's
        return source_names(op.input)
    return [n for operand in op.operands for n in source_names(operand)]


def column_scale(w: SSAValue) -> SSAValue | None:
    """The smoothing scale by which a linear weight's columns were multiplied (its input divided),
    looking through the scales of its rows and the concatenations of fuse-linears; None if none."""
    op = w.owner
    if isinstance(op, L.ScaleOp):
        return op.scale if op.axis.value.data == 1 and not op.inverse.value.data else column_scale(op.input)
    if isinstance(op, L.ConcatOp) and op.axis.value.data == 0:
        found = {s.owner.weight.data if s is not None else None: s for s in map(column_scale, op.inputs)}
        if len(found) != 1:  # (fuse-linears clones each part's expression: compared by the scale's name)
            raise AssertionError("quantize-weights: linears fused over one input are smoothed differently")
        return found.popitem()[1]
    return None


def lm_head_of(module: ModuleOp) -> L.LinearOp | None:
    """The linear op producing the logits (the forward function's first result; through Gemma 2's
    llmir.softcap of them), if one does."""
    ret = forward_func(module).get_return_op()
    logits = ret.operands[0] if ret is not None and ret.operands else None
    if logits is not None and isinstance(logits.owner, L.SoftcapOp):
        logits = logits.owner.input
    return logits.owner if logits is not None and isinstance(logits.owner, L.LinearOp) else None


TIED_HEAD = "quantize-weights: LM head tied to a kept embedding table: float"
TIED_TWICE = "quantize-weights: LM head tied to an embedding table of another type: a second copy"
NOTHING_FITS = "quantize-weights: no weight's inputs fit the scheme's groups: nothing quantized"
NOTHING_FITS_BUT_KEPT = "quantize-weights: the weights that fit the scheme's groups are kept: nothing quantized"


def _names(what: str, user, w: SSAValue, lm_head) -> bool:
    """Whether the `keep` item name `what` (embedding, lm_head or a glob) names the weight `w` of `user`."""
    if what in ("embedding", "lm_head"):
        return isinstance(user, L.EmbeddingOp) if what == "embedding" else user is lm_head
    return any(fnmatch.fnmatchcase(n, what) for n in source_names(w))


def _described(stored: tuple[Scheme, int] | str) -> str:
    """A weight's storage (its scheme and inputs k, or float) in words: float, int4 in groups of 32,
    int8 per row."""
    if stored == "float":
        return "in float"
    scheme, k = stored
    return f"in int{scheme.bits} " + ("per row" if scheme.group_size == k else f"groups of {scheme.group_size}")


def int8_rows(k: int) -> Scheme:
    """8 bits per output row of k inputs, float32 scales, symmetric: an LM head's with bits=8 and
    a keep item's `=int8`."""
    return Scheme(8, k, "float32", "none")


METHODS = ("rtn", "gptq", "autoround")


def learned_weight(w: SSAValue, qtype: L.QuantType, calibration) -> list[Operation] | None:
    """The ops making weight `w` from the codes autoround learned (llmir.packed_weight of format
    learned, concatenated as `w` is), or None when some part of it has none in this type."""
    op = w.owner
    if isinstance(op, L.ConcatOp) and op.axis.value.data == 0:
        parts = [learned_weight(i, qtype, calibration) for i in op.inputs]
        if any(p is None for p in parts):
            return None
        return [o for p in parts for o in p] + [L.ConcatOp([p[-1].results[0] for p in parts], 0)]
    names = source_names(w)
    scheme = calibration.learned.get(names[0]) if len(names) == 1 else None
    if scheme is None or L.QuantType(scheme.bits, scheme.group_size, L.FLOAT_TYPES[scheme.scale_dtype],
                                     scheme.zero) != qtype:
        return None
    return [L.PackedWeightOp(names[0], "learned", L.shape_of(w), qtype)]


ROTATION_BLOCK = 128  # the largest block `rotate` uses (the size QuaRot's online Hadamard of down_proj is built from)


def rotation_block(user: Operation, k: int) -> int:
    """The Hadamard block `rotate` gives the input of `user` (a linear of k inputs), 0 for none:
    the largest power of two up to ROTATION_BLOCK dividing k (at least 16), for a linear reading
    an MLP's activation (act_mul, act: down_proj, GPT-2's c_proj). Only those: on SmolLM2-135M
    (int4, groups of 128 and 64, GPTQ) rotating down_proj's input took perplexity from 12.99 to
    12.72 (float: 11.95); rotating the attention and gate/up inputs as well gave 12.82
    (DESIGN.md, "Rotation")."""
    if not isinstance(user, L.LinearOp) or not isinstance(user.input.owner, (L.ActMulOp, L.ActOp)):
        return 0
    block = ROTATION_BLOCK
    while k % block:
        block //= 2
    return block if block >= 16 else 0


def _rotate_input(user: L.LinearOp, w: SSAValue | None, block: int, rotated: dict) -> SSAValue | None:
    """Makes `user` read hadamard(x) and hadamard(w) for x and w (an activation's llmir.hadamard
    is made once, after its producer: `rotated` keeps them); returns the rotated weight (None
    for w None: learned codes are in the rotated basis already)."""
    x = user.input
    if x not in rotated:
        hx = L.HadamardOp(x, block)
        x.owner.parent_block().insert_op_after(hx, x.owner)
        rotated[x] = hx.result
    user.operands[0] = rotated[x]
    if w is None:
        return None
    hw = L.HadamardOp(w, block)
    user.parent_block().insert_op_before(hw, user)
    replace_weight(user, w, hw.result)
    return hw.result


@dataclass(frozen=True)
class QuantizeWeights(ModulePass):
    name = "quantize-weights"

    bits: int = 0
    group_size: int = 0
    symmetric: bool = True
    scale_dtype: str = "auto"
    keep: tuple[str, ...] = ("embedding",)
    lm_head_bits: int = 0
    rotate: bool = False
    method: str = "rtn"

    def scheme(self, k: int) -> Scheme:
        """The scheme for a weight of k inputs (option values checked here)."""
        if self.bits not in (4, 8):
            raise UsageError(f"{self.name}: bits must be 8 or 4, got {self.bits}" if self.bits else
                             f"{self.name}: give bits=8 or bits=4 (llmirc compile --quant int8|int4 sets them)")
        self._check_group_size(f"{self.name}: group-size")
        group = self.group_size or (k if self.bits == 8 else 32)
        scale = self.scale_dtype
        if scale == "auto":
            scale = "float32" if group == k else "float16"
        else:
            float_type(scale, f"{self.name}{{scale-dtype}}")  # an unknown name fails here
            scale = dtypes.dtype(scale).name
        return Scheme(self.bits, group, scale, "none" if self.symmetric else "int")

    def head_scheme(self, k: int) -> Scheme:
        """The scheme of an LM head of k inputs that is not kept."""
        bits = self.lm_head_bits or (6 if self.bits == 4 else 8)
        if bits == 8:
            return int8_rows(k)
        if bits == 6:  # 6.5 bits a weight, as llama.cpp's Q6_K (6.5625)
            return Scheme(6, 32, "float16", "none")
        if bits != 4:
            raise UsageError(f"{self.name}: lm-head-bits must be 0 (auto), 8, 6 or 4, got {self.lm_head_bits}")
        return dataclasses.replace(self, bits=4).scheme(k)

    def tied_scheme(self, k: int) -> Scheme:
        """The scheme of an LM head not kept and the table it is tied to (one copy): head_scheme's, but
        with bits=8 and lm-head-bits auto 8 bits in groups of 32 with float16 scales, as llama.cpp's Q8_0
        stores a tied token_embd (per output row, the table's rows lose more: SmolLM2's perplexity
        +0.86% over bf16 against +0.54% with the table in float)."""
        if self.bits == 8 and not self.lm_head_bits:
            return Scheme(8, 32, "float16", "none")
        return self.head_scheme(k)

    def keep_items(self) -> list[tuple[str, str, str]]:
        """(item, name, level) of each `keep` item: name is embedding, lm_head or a glob pattern,
        level float or int8 ("" for an item without `=`: float); none for `none`."""
        return [(item, *item.partition("=")[::2]) for item in self.keep if item != "none"]

    def _check_group_size(self, label: str) -> None:
        g = self.group_size
        if g and not (16 <= g <= 512 and g & (g - 1) == 0):
            raise UsageError(f"{label} {g}: must be a power of two from 16 to 512")

    def check(self, labels: dict[str, str] | None = None) -> None:
        """Raises LlmircError for a bad option value (before anything is read or changed).
        `labels`: what to call an option in the message, by its name (the CLI's flag for the ones
        it sets: {"group-size": "--quant-group-size", "keep": "--quant-keep"}); by default
        `quantize-weights: group-size`."""
        def label(option: str) -> str:
            return (labels or {}).get(option, f"{self.name}: {option}")

        self._check_group_size(label("group-size"))
        self.scheme(64), self.head_scheme(64)
        if "none" in self.keep and len(self.keep) > 1:
            raise UsageError(f"{label('keep')} {','.join(self.keep)}: none (quantize everything) cannot go with "
                             "other items")
        for item in self.keep:
            what, sep, level = item.partition("=")
            if not what:
                raise UsageError(f"{label('keep')} {item!r}: no name before '=' (embedding, lm_head or a glob "
                                 "pattern)")
            if what == "none" and sep:  # (none keeps nothing: it has no precision)
                raise UsageError(f"{label('keep')} {item!r}: none (quantize everything) takes no '='")
            if sep and level not in ("float", "int8"):
                raise UsageError(f"{label('keep')} {item!r}: the precision kept is float or int8")

    def calibration(self, ctx: Context):
        """The calibration GPTQ and autoround read (None for round to nearest)."""
        if self.method not in METHODS:
            raise UsageError(f"{self.name}: method must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, "
                             f"got {self.method!r}")
        if self.method == "rtn":
            return None
        calibration = getattr(ctx, "calibration", None)
        if calibration is None:
            raise UsageError(f"{self.name}: method={self.method} needs its calibration data (llmirc compile "
                             f"--quant-method {self.method} --calibration FILE)")
        return calibration

    def kept(self, user, w: SSAValue, lm_head) -> tuple[str | None, str | None]:
        """(level, item): what `keep` says for the weight `w` of `user`, "float", "int8", "head" or None
        (not kept), and the item that says it (the first that names the weight). "head": an `embedding`
        item without `=` naming a table the LM head is tied to, where no item keeps the head: the table is
        stored as the head is (head_scheme: one copy, as llama.cpp quantizes a tied token_embd with its
        output matrix's type; `embedding=float` keeps both in float)."""
        for item, what, level in self.keep_items():
            if _names(what, user, w, lm_head):
                if not level and what == "embedding" and self._tied_to_quantized_head(w, lm_head):
                    return "head", item
                return level or "float", item
        return None, None

    def _tied_to_quantized_head(self, table: SSAValue, lm_head) -> bool:
        """Whether the LM head reads `table`'s float weights (tied) and no keep item names it."""
        if lm_head is None or not L.is_float(lm_head.weight.type.element_type) or \
                not set(source_names(table)) & set(source_names(lm_head.weight)):
            return False
        return not any(_names(what, lm_head, lm_head.weight, lm_head) for _, what, _ in self.keep_items())

    def unmatched_keep(self, op: ModuleOp) -> list[str]:
        """The glob items of `keep` that name no weight of the module (a name from another
        convention, such as GGUF's blk.0.ffn_down, matches nothing: llmir names weights by the
        checkpoint's Hugging Face names)."""
        names = {n for _, w in weight_uses(op) for n in source_names(w)}
        return [item for item, what, _ in self.keep_items() if what not in ("embedding", "lm_head")
                and not any(fnmatch.fnmatchcase(n, what) for n in names)]

    def shadowed_keep(self, op: ModuleOp) -> list[tuple[str, list[str]]]:
        """(item, the items before it that decide instead) for each `keep` item that names weights
        of the module but decides for none of them, the first item naming a weight deciding
        (`*.mlp.*,*.down_proj.*=int8`: the second changes nothing; so does an item given twice)."""
        lm_head, items, uses = lm_head_of(op), self.keep_items(), list(weight_uses(op))
        deciders = [next((i for i, (_, what, _) in enumerate(items) if _names(what, user, w, lm_head)), None)
                    for user, w in uses]
        out = []
        for i, (item, what, _) in enumerate(items):
            named = [d for (user, w), d in zip(uses, deciders) if _names(what, user, w, lm_head)]
            if named and i not in named:
                out.append((item, list(dict.fromkeys(items[d][0] for d in named))))
        return out

    def plan(self, op: ModuleOp, ctx: Context | None = None) -> list[tuple[Operation, SSAValue, int, Scheme]]:
        """(user, weight, k, scheme) of each float weight use this pass quantizes, in IR order;
        changes nothing (the weights kept are counted in ctx's report)."""
        lm_head = lm_head_of(op)
        tables = {n: self.kept(e, t, lm_head)[0] for e, t in weight_uses(op) if isinstance(e, L.EmbeddingOp)
                  for n in source_names(t)}  # source name -> the level `keep` gives the table
        planned, misfits, user_kept, head_float = [], 0, False, False
        for user, w in weight_uses(op):
            if not L.is_float(w.type.element_type):
                continue
            level, item = self.kept(user, w, lm_head)
            if level == "float":
                if user is lm_head:
                    head_float = True
                note(ctx, f"{self.name}: LM head kept" if user is lm_head else f"{self.name}: float (keep {item})")
                user_kept |= item != "embedding"  # (the default keeps the table)
                continue
            n, k = L.shape_of(w)
            if level == "int8":  # a tied table and head kept so share one copy
                wanted = int8_rows(k)
            elif level == "head":  # a table the LM head is tied to: stored as the head (one copy)
                wanted = self.tied_scheme(k)
            elif user is lm_head:
                tied = {tables.get(n) for n in source_names(w)}
                if "float" in tied:  # tied to a kept embedding table: one float copy
                    note(ctx, TIED_HEAD)
                    continue
                # auto follows a table kept in int8 (one copy)
                wanted = int8_rows(k) if "int8" in tied and not self.lm_head_bits else \
                    self.tied_scheme(k) if "head" in tied else self.head_scheme(k)
            else:
                wanted = self.scheme(k)
            scheme = wanted
            while scheme.check(k) is not None and 16 < scheme.group_size != k and k % scheme.group_size:
                scheme = dataclasses.replace(scheme, group_size=scheme.group_size // 2)
            if scheme.group_size != wanted.group_size and scheme.check(k) is None:
                note(ctx, f"{self.name}: groups of {scheme.group_size} for {k} inputs "
                          f"(not a multiple of {wanted.group_size})")
            if scheme.check(k) is not None:
                note(ctx, f"{self.name}: kept a weight of {k} inputs in float (groups of {scheme.group_size})")
                misfits += 1
                continue
            planned.append((user, w, k, scheme))
        if misfits and not planned:
            note(ctx, NOTHING_FITS_BUT_KEPT if user_kept else NOTHING_FITS)
        if lm_head is not None:
            self._check_tied(ctx, op, lm_head, planned, head_float)
        return planned

    def _check_tied(self, ctx, op: ModuleOp, lm_head, planned, head_float: bool) -> None:
        """Notes TIED_TWICE when the LM head and the embedding table it is tied to are stored in two
        types (float and quantized, or two schemes): a second copy of the largest matrix; the two
        storages, described, go to ctx.tied_storage (for compile's note)."""
        names = set(source_names(lm_head.weight))
        stored = {id(user): (scheme, k) for user, _, k, scheme in planned}
        tables = [(user, w) for user, w in weight_uses(op) if isinstance(user, L.EmbeddingOp)
                  and names & set(source_names(w)) and L.is_float(w.type.element_type)]
        if not tables or not L.is_float(lm_head.weight.type.element_type):
            return  # (not tied, or stored quantized by the checkpoint: as it is)
        head = "float" if head_float else stored.get(id(lm_head), "float")
        table = stored.get(id(tables[0][0]), "float")
        if head != table:
            note(ctx, TIED_TWICE)
            if hasattr(ctx, "tied_storage"):  # (llmirc's context; not a plain xDSL one)
                ctx.tied_storage = (_described(table), _described(head))

    def _note_quantized(self, ctx: Context, user, w: SSAValue, lm_head, bits: int) -> None:
        if user is not lm_head:
            level, item = self.kept(user, w, lm_head)
            if level == "head":
                note(ctx, f"{self.name}: embedding table tied to the LM head -> int{bits} (one copy)")
            else:
                note(ctx, f"{self.name}: weight -> int{bits}" + (f" (keep {item})" if level else ""))

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        self.check()
        calibration = self.calibration(ctx)
        lm_head = lm_head_of(op)
        planned = [(user, w, k, s.bits, L.QuantType(s.bits, s.group_size, L.FLOAT_TYPES[s.scale_dtype], s.zero))
                   for user, w, k, s in self.plan(op, ctx)]
        # GPTQ: a linear's weight with its input's Hessian; a table tied to such a linear in the same
        # type shares its codes (one copy, as round to nearest has), other tables round to nearest
        calibrated = {(w, qtype) for user, w, _, _, qtype in planned if isinstance(user, L.LinearOp)}
        made: dict[tuple, SSAValue] = {}
        rotated: dict[SSAValue, SSAValue] = {}  # activation -> its llmir.hadamard
        for user, w, k, bits, qtype in planned:
            block = rotation_block(user, k) if self.rotate else 0
            learned = learned_weight(w, qtype, calibration) if self.method == "autoround" and \
                isinstance(user, L.LinearOp) else None
            if learned:
                if block:
                    _rotate_input(user, None, block, rotated)
                    note(ctx, f"{self.name}: input rotated (hadamard, blocks of {block})")
                user.parent_block().insert_ops_before(learned, user)
                replace_weight(user, w, learned[-1].results[0])
                note(ctx, f"{self.name}: autoround: {calibration.origins[source_names(w)[0]]}")
                self._note_quantized(ctx, user, w, lm_head, bits)
                continue
            gptq = calibration is not None and (w, qtype) in calibrated
            smoothed = column_scale(w)
            if block:
                w = _rotate_input(user, w, block, rotated)
                note(ctx, f"{self.name}: input rotated (hadamard, blocks of {block})")
            hessian = None
            if gptq:
                hessian = calibration.hessian_for(source_names(w))
                if hessian is None:
                    raise LlmircError(f"{self.name}: no calibration data for {', '.join(source_names(w))}")
            key = (w, qtype, hessian)
            if key not in made:
                h = None
                if hessian is not None:
                    h = L.WeightOp(hessian, (k, k))
                    user.parent_block().insert_op_before(h, user)
                    if smoothed is not None:  # the input smoothed: x / s
                        for axis in (0, 1):
                            h = L.ScaleOp(h.result, smoothed, axis, inverse=True)
                            user.parent_block().insert_op_before(h, user)
                    if block:  # then rotated: R x, so R H R (H and R symmetric)
                        for make in (lambda v: L.HadamardOp(v, block), L.TransposeOp,
                                     lambda v: L.HadamardOp(v, block)):
                            h = make(h.results[0])
                            user.parent_block().insert_op_before(h, user)
                    note(ctx, f"{self.name}: GPTQ with calibration")
                q = L.QuantizeOp(w, qtype, h.results[0] if h else None)
                user.parent_block().insert_op_before(q, user)
                made[key] = q.result
                self._note_quantized(ctx, user, w, lm_head, bits)
            if user is lm_head:  # counted apart, also when it shares its table's codes (quantized, tied)
                note(ctx, f"{self.name}: LM head -> int{bits}")
            replace_weight(user, w, made[key])
