"""FLOP accounting for WaveCLIP and its CLIP teacher: 1 multiply-add = 2 FLOPs.

Two counts that check each other:

- **analytic**, from a `WaveCLIPConfig` alone: stage projections, per-layer QKV / output / MLP linears
  over the tokens each stage adds, block-causal attention `4*H*D*sum_s n_s*P_s` (QK^T and PV over the
  allowed pairs, P_s = tokens of blocks <= s), LayerNorm (5 per element, fvcore's convention), the exit
  head (ln_post on the class token + proj) of every exit reached, and the tokenizer.
- **fvcore** (`FlopCountAnalysis`) on a traced module, with handles for the ops it does not know:
  `aten::scaled_dot_product_attention` (fvcore counts it as zero), `aten::_native_multi_head_attention`
  (the no-grad fast path of nn.MultiheadAttention) and every `waveclip::` custom op. fvcore counts a
  multiply-add as one flop; every figure here is converted to FLOPs (x2).

The tokenizer is counted honestly, not as 0: per pixel the BT.601 colour matrix costs 15 FLOPs
(9 multiplies, 6 adds) and every Haar level 3 FLOPs per input element (the 2x2 butterfly is 8 adds and
4 halvings per 4 elements). At 224 px that is ~1.4 MFLOP per image, invisible next to the trunk.

LayerNorm is included by default because fvcore counts it; open_clip's published figures leave it out
(35.13 GFLOPs for ViT-B/16 at 224 px, 35.17 with LayerNorm). Zero-shot logits (embed_dim x classes),
softmax, GELU and residual adds are not counted.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import WaveCLIPConfig

TEACHER_PUBLISHED_GFLOPS = {("ViT-B-16", 224): 35.13}  # open_clip's model profile (image tower)
LAYERNORM_MACS_PER_ELEMENT = 5  # fvcore's count for an affine LayerNorm
COLOR_FLOPS_PER_PIXEL = {"ycbcr": 15, "rgb": 0}
HAAR_FLOPS_PER_ELEMENT = 3


# ------------------------------------------------------------------------------------ analytic


def attention_pairs(block_sizes: Sequence[int]) -> int:
    """sum_s n_s * P_s: (query, key) pairs a block-causal pass computes."""
    pairs, prefix = 0, 0
    for n in block_sizes:
        prefix += n
        pairs += n * prefix
    return pairs


def block_causal_attention_flops(batch: int, heads: int, head_dim: int, block_sizes: Sequence[int]) -> int:
    """4*B*H*D*sum_s n_s*P_s (docs/design.md section 5)."""
    return 4 * batch * heads * head_dim * attention_pairs(block_sizes)


def tokenizer_flops(image_size: Sequence[int], levels: int, color: str = "ycbcr", channels: int = 3) -> int:
    """FLOPs of the colour transform and an L-level Haar DWT on one image (the inverse costs the same)."""
    H, W = image_size
    flops = COLOR_FLOPS_PER_PIXEL[color] * H * W
    for level in range(levels):
        flops += HAAR_FLOPS_PER_ELEMENT * channels * (H >> level) * (W >> level)
    return flops


@dataclass
class StageCost:
    """FLOPs one image spends on stage s (its tokens through the trunk), by part."""

    stage: int
    tokens: int  # tokens this stage adds (class token + grid)
    prefix: int  # tokens of blocks <= s (the keys its queries see)
    embed: int  # stage projection (plus the tokenizer, for stage 0)
    linears: int  # QKV, output projection and MLP over all layers
    attention: int  # QK^T and PV over the prefix, all layers
    layernorm: int  # ln_pre, ln_1/ln_2 per layer, ln_post on the class token
    head: int  # class token @ proj

    @property
    def total(self) -> int:
        return self.embed + self.linears + self.attention + self.layernorm + self.head


def stage_costs(
    config: WaveCLIPConfig, layernorm: bool = True, tokenizer: bool = True, image_size: Sequence[int] | None = None
) -> list[StageCost]:
    """Per-stage FLOPs of one image; the cumulative sums are the exit costs.

    An image of `config.image_size / 2**k` runs the first L+1-k stages and is tokenized with L-k levels
    (the 2**k rescale of its tokens, one multiply per token feature, is not counted, like residual adds).
    One of `config.image_size * 2**j` is box-averaged first: one FLOP per input element, charged to
    stage 0 with the tokenizer.
    """
    size = tuple(config.image_size if image_size is None else image_size)
    stages = config.num_stages_for(size)
    width, hidden, layers = config.width, int(config.width * config.mlp_ratio), config.layers
    ln = 2 * LAYERNORM_MACS_PER_ELEMENT if layernorm else 0
    costs, prefix = [], 0
    for s, (dim, n) in enumerate(zip(config.stage_dims()[:stages], config.block_sizes)):
        prefix += n
        embed = 2 * config.tokens_per_stage * dim * width
        if s == 0 and tokenizer:
            embed += _input_flops(config, size, stages)
        costs.append(
            StageCost(
                stage=s,
                tokens=n,
                prefix=prefix,
                embed=embed,
                linears=layers * 2 * n * width * (4 * width + 2 * hidden),
                attention=layers * 4 * width * n * prefix,
                layernorm=ln * width * (n * (1 + 2 * layers) + 1),
                head=2 * width * config.embed_dim,
            )
        )
    return costs


def _input_flops(config: WaveCLIPConfig, size: tuple[int, int], stages: int) -> int:
    """Tokenizer FLOPs for one image of `size` (plus its box average when it is larger than the tower's)."""
    pool = 0
    if size[0] > config.image_size[0]:
        pool = 3 * size[0] * size[1]
        size = config.image_size
    return pool + tokenizer_flops(size, stages - 1, config.color)


def exit_gflops(
    config: WaveCLIPConfig,
    image_size: Sequence[int] | None = None,
    layernorm: bool = True,
    tokenizer: bool = True,
) -> list[float]:
    """Cumulative GFLOPs of one image answered at each exit it reaches, coarse to fine.

    Exit s includes stages 0..s and the exit heads 0..s (the gate reads every exit it passes).

    Args:
        config: the tower.
        image_size: the input's (H, W) (default: the config's): `config.image_size / 2**k` reaches
            L+1-k exits (see `stage_costs`).
        layernorm: count LayerNorm as fvcore does (5 multiply-adds per element); False gives
            open_clip's published convention.
        tokenizer: count the colour transform and Haar DWT (charged to stage 0).
    """
    out, total = [], 0
    for cost in stage_costs(config, layernorm, tokenizer, image_size):
        total += cost.total
        out.append(total / 1e9)
    return out


def vit_gflops(
    image_size: int | Sequence[int],
    patch_size: int,
    width: int,
    layers: int,
    mlp_ratio: float = 4.0,
    embed_dim: int = 512,
    layernorm: bool = True,
) -> float:
    """Analytic GFLOPs of open_clip's ViT image tower (patch conv, dense attention, ln_post on all tokens)."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    patches = (H // patch_size) * (W // patch_size)
    n, hidden = patches + 1, int(width * mlp_ratio)
    total = 2 * patches * 3 * patch_size**2 * width
    total += layers * (2 * n * width * (4 * width + 2 * hidden) + 4 * n * n * width)
    total += 2 * width * embed_dim
    if layernorm:
        total += 2 * LAYERNORM_MACS_PER_ELEMENT * n * width * (2 * layers + 2)
    return total / 1e9


def teacher_gflops_analytic(config: WaveCLIPConfig, layernorm: bool = True) -> float:
    """The teacher's cost at the config's image size, from the trunk sizes."""
    return vit_gflops(
        config.image_size, config.teacher_patch_size, config.width, config.layers, config.mlp_ratio,
        config.embed_dim, layernorm,
    )  # fmt: skip


# -------------------------------------------------------------------------------------- fvcore
# Handles return multiply-adds (fvcore's unit); `count_gflops` doubles the total.


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _const(value):
    """The Python value behind a traced graph value when it is built from constants, else None.

    Tensor constants are not trusted: the tracer records a captured tensor by reference, so an in-place
    update after the traced call (a cache length advanced by the caller) would be read here.
    """
    node = value.node()
    kind = node.kind()
    args = list(node.inputs())
    if kind == "prim::Constant":
        constant = value.toIValue()
        return None if isinstance(constant, torch.Tensor) else constant
    if kind == "prim::ListConstruct":
        items = [_const(a) for a in args]
        return None if any(i is None for i in items) else items
    if kind == "aten::size":
        dim = _const(args[1])
        return None if dim is None else _shape(args[0])[dim]
    if kind in ("prim::NumToTensor", "aten::Int", "aten::ScalarImplicit"):
        return _const(args[0])
    if kind in ("aten::full", "aten::new_full"):
        size, fill = (_const(a) for a in (args[:2] if kind == "aten::full" else args[1:3]))
        return None if size is None or fill is None else torch.full(size, fill)
    if kind in ("aten::zeros", "aten::ones"):
        size = _const(args[0])
        return None if size is None else (torch.zeros if kind == "aten::zeros" else torch.ones)(size)
    identity = ("aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::detach", "aten::lift_fresh")
    if kind in identity or kind in ("aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh_copy"):
        return _const(args[0])
    if kind in ("aten::add", "aten::add_", "aten::sub", "aten::sub_"):
        a, b = _const(args[0]), _const(args[1])
        alpha = _const(args[2]) if len(args) > 2 else 1
        if a is None or b is None or alpha is None:
            return None
        return a + alpha * b if kind.startswith("aten::add") else a - alpha * b
    return None


def _sdpa_handle(inputs, outputs):
    """batch * Lq * Lk * (D + Dv); causal masks count the visible pairs, other masks count dense."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    Lq, Lk = q[-2], k[-2]
    pairs = Lq * Lk
    is_causal = _const(inputs[5]) if len(inputs) > 5 else False
    if is_causal:
        pairs = sum(min(Lk, i + 1 + Lk - Lq) for i in range(Lq))
    return batch * pairs * (q[-1] + v[-1])


def _native_mha_handle(inputs, outputs):
    """aten::_native_multi_head_attention: in-projections, attention, out-projection."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    E = _const(inputs[3])
    batch = math.prod(q[:-2])
    Lq, Lk = q[-2], k[-2]
    return batch * (Lq * E * E + 2 * Lk * E * E + 2 * Lq * Lk * E + Lq * E * E)


def _block_causal_handle(inputs, outputs):
    """waveclip::block_causal_attention(q, k, v, block_sizes, scale, impl): B*H*(D+Dv)*sum n_s P_s."""
    q, v = _shape(inputs[0]), _shape(inputs[2])
    block_sizes = _const(inputs[3])
    pairs = attention_pairs(block_sizes) if block_sizes is not None else q[-2] * q[-2]
    return q[0] * q[1] * pairs * (q[-1] + v[-1])


def _kv_append_handle(inputs, outputs, cache_lens: Sequence[int] | None = None):
    """waveclip::attention_with_kv_append: each query row b attends c_b + n keys.

    c_b comes from `cache_lens` when given (their values before the call), else from the trace when the
    lengths are built there from constants (e.g. a fresh `torch.zeros(B)`); otherwise every row is
    counted against the whole cache, an upper bound, with a warning.
    """
    q, v, cache = _shape(inputs[0]), _shape(inputs[2]), _shape(inputs[3])
    B, H, n, D = q
    lens = cache_lens
    if lens is None and len(inputs) > 9:  # the checked host lengths of a planned call (int list constants)
        lens = _const(inputs[9])
    if lens is None:
        lens = _const(inputs[5])
    if lens is None:
        warnings.warn(
            "waveclip::attention_with_kv_append: cache_lens is not known at trace time; counting each row "
            "against the whole cache (an upper bound); pass cache_lens to flop_count_analysis",
            stacklevel=2,
        )
        keys = B * cache[2]
    else:
        lens = torch.as_tensor(lens).flatten()
        if lens.numel() != B:
            raise ValueError(f"cache_lens has {lens.numel()} values for a query batch of {B}")
        keys = int(lens.sum().item()) + B * n
    return H * n * keys * (D + v[-1])


def _tokenize_handle(inputs, outputs):
    """waveclip::wavelet_tokenize(images, levels, grid, color, out_dtype, impl)."""
    B, C, H, W = _shape(inputs[0])
    return B * tokenizer_flops((H, W), _const(inputs[1]), _const(inputs[3]), C) / 2


def _detokenize_handle(inputs, outputs):
    """waveclip::wavelet_detokenize(tokens, levels, grid, color, image_size, impl)."""
    B, C, H, W = _shape(outputs[0])
    return B * tokenizer_flops((H, W), _const(inputs[1]), _const(inputs[3]), C) / 2


HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": _sdpa_handle,
    "aten::_native_multi_head_attention": _native_mha_handle,
    "waveclip::block_causal_attention": _block_causal_handle,
    "waveclip::attention_with_kv_append": _kv_append_handle,
    "waveclip::wavelet_tokenize": _tokenize_handle,
    "waveclip::wavelet_detokenize": _detokenize_handle,
}


def flop_count_analysis(model: torch.nn.Module, inputs, cache_lens: Sequence[int] | None = None):
    """fvcore's FlopCountAnalysis with the handles above (its counts are multiply-adds).

    Args:
        model, inputs: what fvcore traces, `model(*inputs)`.
        cache_lens: the cache lengths every `attention_with_kv_append` in the trace starts from, when
            they are not built from constants inside it (see `_kv_append_handle`).
    """
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    for name, handle in HANDLES.items():
        analysis.set_op_handle(name, handle)
    if cache_lens is not None:
        lens = [int(c) for c in cache_lens]
        analysis.set_op_handle(
            "waveclip::attention_with_kv_append", functools.partial(_kv_append_handle, cache_lens=lens)
        )
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def count_gflops(model: torch.nn.Module, inputs, cache_lens: Sequence[int] | None = None) -> float:
    """GFLOPs of `model(*inputs)` by fvcore with every handle, 1 multiply-add = 2 FLOPs."""
    return 2 * flop_count_analysis(model, inputs, cache_lens).total() / 1e9


class _Call(torch.nn.Module):
    """Wraps a function of `model` so fvcore can trace it (the model's parameters stay parameters)."""

    def __init__(self, fn: Callable, model: torch.nn.Module):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *args):
        return self.fn(*args)


def fvcore_exit_gflops(model, images: torch.Tensor | None = None) -> list[float]:
    """Cumulative GFLOPs per image at each exit of a `waveclip.WaveCLIP`, by fvcore on the incremental path.

    `start` (tokenizer, stage 0, exit 0) and every `refine` are traced one after the other on the same
    state, so each stage is charged for exactly the tokens it runs and the keys it reads from the cache.

    Args:
        model: a WaveCLIP tower.
        images: (B, 3, H, W) inputs (default: one random image of the config's size).
    """
    cfg = model.config
    if images is None:
        images = torch.randn(1, 3, *cfg.image_size, dtype=model.dtype, device=model.proj.device)
    batch = images.shape[0]
    state = {}

    def start(x):
        state["s"] = model.start(x)
        return state["s"].latest()

    out, total = [], 0.0
    total += count_gflops(_Call(start, model), (images,))
    out.append(total / batch)
    for _ in range(state["s"].num_stages - 1):
        lens = state["s"].cache_lens.tolist()  # before the step: refine advances them in place
        total += count_gflops(_Call(lambda: model.refine(state["s"]), model), (), lens)
        out.append(total / batch)
    return out


def teacher_gflops(model_name: str = "ViT-B-16", image_size: int = 224) -> float:
    """GFLOPs of one image through open_clip's `model_name` image tower (random weights), by fvcore.

    Traced with autograd on so nn.MultiheadAttention decomposes into linears + SDPA (both handled);
    LayerNorm is counted, as fvcore does: ViT-B-16 at 224 px gives 35.17 (35.13 published without it).
    """
    import open_clip

    kwargs = {} if image_size == 224 else {"force_image_size": image_size}
    visual = open_clip.create_model(model_name, pretrained=None, **kwargs).visual.eval()
    with torch.enable_grad():
        return count_gflops(visual, (torch.randn(1, 3, image_size, image_size),))


def exit_table(
    config: WaveCLIPConfig, teacher_gflops_value: float | None = None, image_size: Sequence[int] | None = None
) -> list[dict]:
    """Rows for the per-exit table: tokens, GFLOPs (with / without LayerNorm) and % of the teacher.

    The percentage compares like with like: both counted with LayerNorm, against `teacher_gflops_value`
    when given (a fvcore figure), else the analytic teacher of the same trunk, at the config's size.
    `image_size` gives the rows of a smaller (or larger) input (see `stage_costs`).
    """
    teacher = teacher_gflops_value or teacher_gflops_analytic(config)
    with_ln, without_ln = exit_gflops(config, image_size), exit_gflops(config, image_size, layernorm=False)
    rows, tokens = [], 0
    for s, n in enumerate(config.block_sizes[: len(with_ln)]):
        tokens += n
        rows.append(
            {
                "exit": s,
                "tokens": tokens,
                "gflops": with_ln[s],
                "gflops_no_layernorm": without_ln[s],
                "percent_of_teacher": 100 * with_ln[s] / teacher,
            }
        )
    return rows
