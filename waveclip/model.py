"""The WaveCLIP vision tower (docs/design.md section 2).

Read top to bottom: wavelet tokens -> stage embeddings -> block-causal trunk -> one exit per stage.

The sequence is `[CLS_0, T_0 | CLS_1, T_1 | ... | CLS_L, T_L]`. Attention is block-causal: a token of
stage block s sees every token of blocks <= s, so the keys and values of earlier blocks never depend on
later ones. `forward` runs all blocks in one pass; `start` + `refine` run them one at a time, reusing the
cached keys and values, and give the same exits. Parameter names follow open_clip's VisionTransformer
so that its trunk copies over by state dict.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import waveclip_kernels as wk
from waveclip_kernels.api import IMPLS

from .cache import InferenceState
from .config import WaveCLIPConfig

# attend(q, k, v) -> out, all (B, heads, n, head_dim): the attention pattern a trunk pass uses.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head attention with a fused QKV projection; parameters named as in nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        B, n, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, n, 3, self.heads, width // self.heads)
        # One copy into head-major layout: q, k, v are then contiguous (B, H, n, D) tensors.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()
        out = attend(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, n, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=QuickGELU() if quick_gelu else nn.GELU(),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )


class WaveCLIP(nn.Module):
    """CLIP vision tower on wavelet tokens with one exit per stage.

    Args:
        config: the tower's sizes and tokenizer settings.
        impl: kernel implementation passed to the `waveclip_kernels` ops ("auto", "triton", "cuda",
            "cpu" or "reference"); `forward`, `start` and `tokenize` take an override.
    """

    def __init__(self, config: WaveCLIPConfig, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.config, self.impl = config, impl
        width, S = config.width, config.num_stages
        scale = width**-0.5
        self.stage_proj = nn.ModuleList(nn.Linear(dim, width, bias=False) for dim in config.stage_dims())
        self.class_embedding = nn.Parameter(scale * torch.randn(S, width))  # CLS_s, one per stage block
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.tokens_per_stage, width))  # per cell
        self.level_embedding = nn.Parameter(scale * torch.randn(S, width))  # added to stage s's grid tokens
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, config.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    # ------------------------------------------------------------------------------- building blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.dtype

    def tokenize(self, images: Tensor, impl: str | None = None) -> list[Tensor]:
        """(B, 3, H, W) CLIP-preprocessed images -> L+1 stage tokens (B, Gh*Gw, dim_s) in the model's dtype."""
        cfg = self.config
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if tuple(images.shape[-2:]) != cfg.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} pixels but this tower takes {cfg.image_size} "
                f"(L={cfg.levels}, grid {cfg.grid}); resize/crop them to {cfg.image_size} first"
            )
        return wk.wavelet_tokenize(
            images, cfg.levels, cfg.grid, cfg.color, out_dtype=self.dtype, impl=impl or self.impl
        )

    def embed_stage(self, s: int, tokens: Tensor) -> Tensor:
        """Stage block s: (B, Gh*Gw, dim_s) tokens -> (B, 1 + Gh*Gw, width) = [CLS_s, W_s t + pos + level_s]."""
        grid = self.stage_proj[s](tokens) + self.positional_embedding + self.level_embedding[s]
        cls = self.class_embedding[s].expand(tokens.shape[0], 1, -1)
        return torch.cat([cls, grid], dim=1)

    def exit(self, cls: Tensor) -> Tensor:
        """(..., width) class-token states -> (..., embed_dim) unit exit embeddings."""
        return F.normalize(self.ln_post(cls) @ self.proj, dim=-1)

    def _check_tokens(self, tokens: Sequence[Tensor]) -> None:
        dims = self.config.stage_dims()
        if len(tokens) != len(dims):
            raise ValueError(f"expected {len(dims)} stage token tensors, got {len(tokens)}")
        for s, (t, d) in enumerate(zip(tokens, dims)):
            expected = (tokens[0].shape[0], self.config.tokens_per_stage, d)
            if tuple(t.shape) != expected:
                raise ValueError(f"tokens[{s}] must have shape {expected}, got {tuple(t.shape)}")

    # ------------------------------------------------------------------------------------ full pass

    def forward(self, images: Tensor, impl: str | None = None) -> Tensor:
        """Every exit in one block-causal pass.

        Args:
            images: (B, 3, H, W) CLIP-preprocessed images of the config's image size.
            impl: kernel impl override (default: the model's).

        Returns:
            (B, L+1, embed_dim) unit-norm exit embeddings, coarse to fine.
        """
        return self.forward_tokens(self.tokenize(images, impl), impl)

    def forward_tokens(self, tokens: Sequence[Tensor], impl: str | None = None) -> Tensor:
        """`forward` from already tokenized images (L+1 tensors (B, Gh*Gw, dim_s))."""
        self._check_tokens(tokens)
        x = torch.cat([self.embed_stage(s, t) for s, t in enumerate(tokens)], dim=1)
        x = self.ln_pre(x)
        block_sizes = self.config.block_sizes
        attend = functools.partial(wk.block_causal_attention, block_sizes=block_sizes, impl=impl or self.impl)
        for block in self.transformer.resblocks:
            x = block(x, attend)
        cls_positions = [sum(block_sizes[:s]) for s in range(len(block_sizes))]
        return self.exit(x[:, cls_positions])

    # ---------------------------------------------------------------------------- incremental pass

    @torch.inference_mode()
    def start(self, images: Tensor, impl: str | None = None) -> InferenceState:
        """Tokenize once, allocate the KV cache for every stage and run stage 0.

        Returns:
            The state; `state.latest()` is the (B, embed_dim) stage-0 exit.
        """
        impl = impl or self.impl
        cfg = self.config
        tokens = self.tokenize(images, impl)
        state = InferenceState.allocate(
            tokens, cfg.layers, cfg.heads, sum(cfg.block_sizes), cfg.head_dim, cfg.embed_dim, impl
        )
        self._run_stage(state, 0, state.active)
        return state

    @torch.inference_mode()
    def refine(self, state: InferenceState, active: Tensor | Sequence | None = None) -> Tensor:
        """Run the next stage for the active samples, appending their keys and values to the cache.

        Args:
            state: from `start`, advanced in place.
            active: which samples go on: None (all that ran the latest stage), a (B,) boolean mask or
                batch indices; a subset of `state.active`. The others have exited for good.

        Returns:
            (n, embed_dim) exit embeddings of the new stage, rows in increasing batch order.
        """
        if state.stage + 1 >= state.num_stages:
            raise ValueError(f"every stage has run already (stage {state.stage} is the last)")
        return self._run_stage(state, state.stage + 1, state.select(active))

    def _run_stage(self, state: InferenceState, s: int, rows: Tensor) -> Tensor:
        n = self.config.block_sizes[s]
        state.stage, state.active = s, rows
        if rows.numel() == 0:
            return state.embeddings[rows, s]
        full_batch = rows.numel() == state.batch_size
        batch_index = None if full_batch else rows
        tokens = state.tokens[s] if full_batch else state.tokens[s][rows]
        # Rows that run stage s ran every stage before it: each cache row holds blocks < s. Checked
        # once here, the plan serves every layer.
        filled = sum(self.config.block_sizes[:s])
        plan = wk.kv_append_plan([filled] * rows.numel(), batch_index, n, state.keys[0])
        x = self.ln_pre(self.embed_stage(s, tokens))
        for layer, block in enumerate(self.transformer.resblocks):
            attend = functools.partial(
                wk.attention_with_kv_append,
                k_cache=state.keys[layer],
                v_cache=state.values[layer],
                cache_lens=plan,
                impl=state.impl,
            )
            x = block(x, attend)
        z = self.exit(x[:, 0])
        state.cache_lens[rows] += n
        state.last_stage[rows] = s
        state.embeddings[rows, s] = z
        return z

    # ------------------------------------------------------------------------- checkpoints, teacher

    @classmethod
    def from_open_clip(cls, teacher: nn.Module, config: WaveCLIPConfig | None = None, impl: str = "auto") -> WaveCLIP:
        """A student initialised from an open_clip CLIP (or its `.visual`) as docs/design.md section 2 says."""
        from .interop import from_open_clip

        return from_open_clip(teacher, config, impl)

    def save_pretrained(self, directory) -> None:
        """Write `model.safetensors` and `config.json` into `directory`."""
        from .interop import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, impl: str = "auto", device: str | torch.device = "cpu") -> WaveCLIP:
        """Load a tower written by `save_pretrained`."""
        from .interop import load_pretrained

        return load_pretrained(directory, impl, device)
