"""The WaveCLIP vision tower (docs/design.md section 2).

Read top to bottom: wavelet tokens -> stage embeddings -> block-causal trunk -> one exit per stage.

The sequence is `[CLS_0, T_0 | CLS_1, T_1 | ... | CLS_L, T_L]`. Attention is block-causal: a token of
stage block s sees every token of blocks <= s, so the keys and values of earlier blocks never depend on
later ones. `forward` runs all blocks in one pass; `start` + `refine` run them one at a time, reusing the
cached keys and values, and give the same exits. Parameter names follow open_clip's VisionTransformer
so that its trunk copies over by state dict.

One tower serves every dyadic size below its own: an image of `image_size / 2**k` is tokenized with
L-k levels, and its tokens times 2**k are exactly the first L+1-k stages of any full-size image it is
the 2**k x 2**k box average of (docs/design.md section 1), so it runs those stages and gets their exits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import waveclip_kernels as wk
from waveclip_kernels.api import IMPLS

from . import checkpoint
from .cache import InferenceState
from .config import PRESETS, WaveCLIPConfig
from .initialization import TEACHER_RECORD, check_trunk, copy_from_teacher, text_tower_sha256, trunk_config

# attend(q, k, v) -> out, all (B, heads, n, head_dim): the attention pattern a trunk pass uses.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

# The ops a tower calls: an explicit impl must run all of them.
MODEL_OPS = ("wavelet_tokenize", "block_causal_attention", "attention_with_kv_append")


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


def _device_for(impl: str) -> str:
    """The device type an explicit impl runs its ops on."""
    if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_impl(impl: str) -> None:
    """Refuse an impl that cannot run every op of the tower (`waveclip_kernels.available_impls`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("auto", "reference"):
        return
    device = _device_for(impl)
    runs = wk.available_impls(device)
    missing = [op for op in MODEL_OPS if impl not in runs[op]]
    if missing:
        usable = [i for i in IMPLS[1:] if all(i in runs[op] for op in MODEL_OPS)]
        detail = "; ".join(f"{op} runs with {runs[op]}" for op in missing)
        raise RuntimeError(
            f'WaveCLIP: impl="{impl}" cannot run every op of the tower on {device} here ({detail}); '
            f'use impl="auto" or one of {usable}'
        )


class WaveCLIP(nn.Module):
    """CLIP vision tower on wavelet tokens with one exit per stage.

    Args:
        config: the tower's sizes and tokenizer settings.
        impl: kernel implementation passed to the `waveclip_kernels` ops ("auto", "triton", "cuda",
            "cpu" or "reference"); an explicit one must run every op the tower calls. `forward`,
            `start` and `tokenize` take an override.
    """

    def __init__(self, config: WaveCLIPConfig, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
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

    def num_stages_for(self, image_size) -> int:
        """Stages an image of `image_size` (H, W) runs: L+1-k at `config.image_size / 2**k`."""
        return self.config.num_stages_for(image_size)

    def tokenize(self, images: Tensor, impl: str | None = None) -> list[Tensor]:
        """(B, 3, H, W) CLIP-preprocessed images -> their stage tokens (B, Gh*Gw, dim_s) in the model's dtype.

        At the config's image size: all L+1 stages. At `image_size / 2**k`: the first L+1-k stages,
        tokenized with L-k levels and multiplied by 2**k, which makes them equal to the leading
        stages of any full-size image whose 2**k x 2**k box average the input is. At `image_size * 2**j`: the image
        is box-averaged to `image_size` first, which is exactly dropping its j finest detail levels.
        """
        cfg = self.config
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        size = tuple(int(d) for d in images.shape[-2:])
        stages = cfg.num_stages_for(size)
        if size[0] > cfg.image_size[0]:
            images = F.avg_pool2d(images, size[0] // cfg.image_size[0])
        k = cfg.num_stages - stages
        tokens = wk.wavelet_tokenize(
            images, cfg.levels - k, cfg.grid, cfg.color, out_dtype=self.dtype, impl=impl or self.impl
        )
        return [t * 2**k for t in tokens] if k else tokens

    def embed_stage(self, s: int, tokens: Tensor) -> Tensor:
        """Stage block s: (B, Gh*Gw, dim_s) tokens -> (B, 1 + Gh*Gw, width) = [CLS_s, W_s t + pos + level_s]."""
        grid = self.stage_proj[s](tokens) + self.positional_embedding + self.level_embedding[s]
        cls = self.class_embedding[s].expand(tokens.shape[0], 1, -1)
        return torch.cat([cls, grid], dim=1)

    def exit(self, cls: Tensor) -> Tensor:
        """(..., width) class-token states -> (..., embed_dim) unit exit embeddings."""
        return F.normalize(self.ln_post(cls) @ self.proj, dim=-1)

    def _check_stage_tokens(self, s: int, t, batch: int) -> None:
        expected = (batch, self.config.tokens_per_stage, self.config.stage_dims()[s])
        if not isinstance(t, Tensor) or tuple(t.shape) != expected or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"tokens[{s}] must be a float tensor of shape {expected}, got {got}")

    def _check_tokens(self, tokens: Sequence[Tensor]) -> None:
        """1 to L+1 leading stage tensors (stage 0 first), as `tokenize` returns them."""
        if not isinstance(tokens, Sequence) or not 1 <= len(tokens) <= self.config.num_stages:
            count = len(tokens) if isinstance(tokens, Sequence) else type(tokens).__name__
            raise ValueError(f"expected 1 to {self.config.num_stages} stage token tensors (stage 0 first), got {count}")
        for s, t in enumerate(tokens):
            self._check_stage_tokens(s, t, tokens[0].shape[0] if isinstance(tokens[0], Tensor) else -1)

    # ------------------------------------------------------------------------------------ full pass

    def forward(self, images: Tensor, impl: str | None = None) -> Tensor:
        """Every exit the images reach, in one block-causal pass.

        Args:
            images: (B, 3, H, W) CLIP-preprocessed images of `config.image_size / 2**k` (k = 0..L), or of
                `config.image_size` times a power of two (box-averaged down to it).
            impl: kernel impl override (default: the model's).

        Returns:
            (B, L+1-k, embed_dim) unit-norm exit embeddings, coarse to fine.
        """
        return self.forward_tokens(self.tokenize(images, impl), impl)

    def forward_tokens(self, tokens: Sequence[Tensor], impl: str | None = None) -> Tensor:
        """`forward` from stage tokens: the first n stages (1 <= n <= L+1) -> (B, n, embed_dim)."""
        self._check_tokens(tokens)
        x = torch.cat([self.embed_stage(s, t.to(self.dtype)) for s, t in enumerate(tokens)], dim=1)
        x = self.ln_pre(x)
        block_sizes = self.config.block_sizes[: len(tokens)]
        attend = functools.partial(wk.block_causal_attention, block_sizes=block_sizes, impl=impl or self.impl)
        for block in self.transformer.resblocks:
            x = block(x, attend)
        cls_positions = [sum(block_sizes[:s]) for s in range(len(block_sizes))]
        return self.exit(x[:, cls_positions])

    # ---------------------------------------------------------------------------- incremental pass

    @torch.no_grad()
    def start(
        self, images: Tensor | None = None, impl: str | None = None, *, tokens: Sequence[Tensor] | None = None
    ) -> InferenceState:
        """Allocate the KV cache and run stage 0, from images or from stage tokens.

        Args:
            images: (B, 3, H, W) images, as `forward` takes them; tokenized once. The state then reaches
                the stages the image size has (`num_stages_for`).
            impl: kernel impl override.
            tokens: instead of images, the leading stage tensors (at least stage 0) as `tokenize` gives
                them; later stages can arrive with `refine(state, tokens=...)`, up to all L+1.

        Returns:
            The state; `state.latest()` is the (B, embed_dim) stage-0 exit.
        """
        if (images is None) == (tokens is None):
            raise ValueError("start takes images or tokens= (the leading stage tensors), exactly one of them")
        impl = impl or self.impl
        cfg = self.config
        if images is not None:
            tokens = self.tokenize(images, impl)
            num_stages = len(tokens)
        else:
            self._check_tokens(tokens)
            tokens = [t.to(self.dtype) for t in tokens]
            num_stages = cfg.num_stages
        state = InferenceState.allocate(
            list(tokens), num_stages, cfg.layers, cfg.heads, sum(cfg.block_sizes[:num_stages]), cfg.head_dim,
            cfg.embed_dim, impl,
        )  # fmt: skip
        self._run_stage(state, 0, state.active)
        return state

    @torch.no_grad()
    def refine(
        self, state: InferenceState, active: Tensor | Sequence | None = None, tokens: Tensor | None = None
    ) -> Tensor:
        """Run the next stage for the active samples, appending their keys and values to the cache.

        Args:
            state: from `start`, advanced in place.
            active: which samples go on: None (all that ran the latest stage), a (B,) boolean mask or
                batch indices; a subset of `state.active`. The others have exited for good. An empty
                set exits everyone: nothing runs and the stage stays where it is.
            tokens: the next stage's tokens when the state was started from tokens that stop before it:
                (B, Gh*Gw, dim) for the whole batch, or (n, Gh*Gw, dim) for the samples that go on, in
                increasing batch order.

        Returns:
            (n, embed_dim) exit embeddings of the new stage, rows in increasing batch order.
        """
        if state.active.numel() == 0:
            raise ValueError(f"every sample has exited (the latest stage run was {state.stage}): nothing to refine")
        if state.stage + 1 >= state.num_stages:
            raise ValueError(f"every stage has run already (stage {state.stage} is the last)")
        rows = state.select(active)
        s = state.stage + 1
        self._receive_tokens(state, s, rows, tokens)
        if rows.numel() == 0:
            state.active = rows
            return state.embeddings[rows, state.stage]
        return self._run_stage(state, s, rows)

    def _receive_tokens(self, state: InferenceState, s: int, rows: Tensor, tokens: Tensor | None) -> None:
        """Check and store stage s's tokens (given, or known since `start`) before anything runs."""
        known = len(state.tokens) > s
        if tokens is None:
            if not known and rows.numel():
                raise ValueError(f"stage {s}'s tokens are not known yet: pass refine(state, tokens=...)")
            return
        if known:
            raise ValueError(f"stage {s}'s tokens are known already (from the images or earlier tokens)")
        B = state.batch_size
        n = B if isinstance(tokens, Tensor) and tokens.dim() == 3 and tokens.shape[0] == B else rows.numel()
        self._check_stage_tokens(s, tokens, n)
        tokens = tokens.to(device=state.keys.device, dtype=self.dtype)
        if n != B:
            full = tokens.new_full((B, *tokens.shape[1:]), float("nan"))  # rows that exited never run
            full[rows] = tokens
            tokens = full
        state.tokens.append(tokens)

    def _run_stage(self, state: InferenceState, s: int, rows: Tensor) -> Tensor:
        n = self.config.block_sizes[s]
        state.stage, state.active = s, rows
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
        state.embeddings[rows, s] = z.to(state.embeddings.dtype)
        return z

    # ------------------------------------------------------------------------- checkpoints, teacher

    @classmethod
    def from_open_clip(cls, teacher: nn.Module, config: WaveCLIPConfig | None = None, impl: str = "auto") -> WaveCLIP:
        """A student initialised from an open_clip CLIP (or its `.visual`) as docs/design.md section 2 says.

        The config records which teacher it pairs with. A teacher from `waveclip.load_teacher` says so
        itself, and its record replaces the config's teacher fields; for any other teacher `config` must
        be given, and its fields are taken as the caller's word. The text tower's sha256 is recorded
        whenever the teacher has one.

        Args:
            teacher: open_clip CLIP or VisionTransformer.
            config: the student's config (default: the `waveclip-vit-b-16` preset with the teacher's trunk
                sizes); its trunk sizes must match the teacher's.
            impl: kernel impl of the student.
        """
        loader_record = getattr(teacher, TEACHER_RECORD, None)
        if config is None:
            if loader_record is None:
                raise ValueError(
                    "from_open_clip cannot tell which open_clip model this teacher is: load it with "
                    "waveclip.load_teacher(name, weights), or pass a config whose `teacher` names it"
                )
            config = dataclasses.replace(PRESETS["waveclip-vit-b-16"], **trunk_config(teacher))
        check_trunk(config, teacher)
        record = dict(loader_record or {}, teacher_text_sha256=text_tower_sha256(teacher))
        config = dataclasses.replace(config, **record)
        visual = getattr(teacher, "visual", teacher)
        student = cls(config, impl=impl).to(device=visual.proj.device, dtype=visual.proj.dtype)
        copy_from_teacher(student, teacher)
        return student

    def save_pretrained(self, directory) -> None:
        """Write `model.safetensors` and `config.json` into `directory`."""
        checkpoint.save(self.state_dict(), self.config, directory)

    @classmethod
    def from_pretrained(cls, directory, impl: str = "auto", device: str | torch.device = "cpu") -> WaveCLIP:
        """Load a tower written by `save_pretrained`, in the dtype it was saved in.

        Raises:
            FileNotFoundError: a file is missing. ValueError: a file is corrupt or does not fit the
                config (the message names the file).
        """
        config = checkpoint.read_config(directory)
        state = checkpoint.read_state(directory, device)
        if "proj" not in state:
            raise ValueError(f"{directory}/{checkpoint.WEIGHTS_NAME}: no WaveCLIP weights (no 'proj' tensor)")
        model = cls(config, impl=impl).to(device=device, dtype=state["proj"].dtype)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"{directory}/{checkpoint.WEIGHTS_NAME} does not fit its config.json: {detail}") from err
        return model.eval()
