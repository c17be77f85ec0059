"""The tiny tower's exits against stored values and against an independent float64 forward.

The oracle below is written from docs/design.md section 2 and reads only the tower's state_dict: PyWavelets
tokens, stage embeddings `W_s t + pos + level_s` after a class token per stage, ln_pre, CLIP residual blocks
written out (pre-LN, fused QKV, plain softmax attention under an explicit boolean block-causal mask,
QuickGELU MLP), then `normalize(ln_post(CLS_s) @ proj)`. It never calls the model's own methods.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import pywt_tokens, seeded_images, seeded_tiny_tower

pytest.importorskip("pywt")

STORED = Path(__file__).parents[1] / "data" / "tiny_tower_exits.json"


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def block_causal_mask(block_sizes: list[int]) -> torch.Tensor:
    """True where query i may attend key j: key j's block is not after query i's block."""
    block_of = [s for s, n in enumerate(block_sizes) for _ in range(n)]
    n = len(block_of)
    return torch.tensor([[block_of[j] <= block_of[i] for j in range(n)] for i in range(n)])


def attention(x: torch.Tensor, p: dict, prefix: str, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention with a fused QKV projection, softmax over the keys the mask allows."""
    B, N, width = x.shape
    hd = width // heads
    qkv = x @ p[prefix + "in_proj_weight"].T + p[prefix + "in_proj_bias"]
    q, k, v = (t.reshape(B, N, heads, hd).transpose(1, 2) for t in qkv.split(width, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(1, 2).reshape(B, N, width)
    return out @ p[prefix + "out_proj.weight"].T + p[prefix + "out_proj.bias"]


def oracle_exits(state: dict, config, images: torch.Tensor) -> torch.Tensor:
    """(B, L+1, embed_dim) exits of the tower whose parameters are `state`, from docs/design.md only."""
    p = {name: t.detach().double() for name, t in state.items()}
    arrays = pywt_tokens(images.double().numpy(), config.levels, config.grid, config.color)
    tokens = [torch.from_numpy(t) for t in arrays]
    B, S = images.shape[0], len(tokens)
    blocks = []
    for s, t in enumerate(tokens):
        grid = t @ p[f"stage_proj.{s}.weight"].T + p["positional_embedding"] + p["level_embedding"][s]
        cls = p["class_embedding"][s].expand(B, 1, -1)
        blocks.append(torch.cat([cls, grid], dim=1))
    x = layer_norm(torch.cat(blocks, dim=1), p["ln_pre.weight"], p["ln_pre.bias"])
    block_sizes = [b.shape[1] for b in blocks]
    mask = block_causal_mask(block_sizes)
    for layer in range(config.layers):
        r = f"transformer.resblocks.{layer}."
        x = x + attention(layer_norm(x, p[r + "ln_1.weight"], p[r + "ln_1.bias"]), p, r + "attn.", config.heads, mask)
        h = layer_norm(x, p[r + "ln_2.weight"], p[r + "ln_2.bias"])
        h = h @ p[r + "mlp.c_fc.weight"].T + p[r + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h) if config.quick_gelu else torch.nn.functional.gelu(h)
        x = x + h @ p[r + "mlp.c_proj.weight"].T + p[r + "mlp.c_proj.bias"]
    starts = [sum(block_sizes[:s]) for s in range(S)]
    z = layer_norm(x[:, starts], p["ln_post.weight"], p["ln_post.bias"]) @ p["proj"]
    return z / z.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tower():
    return seeded_tiny_tower()


@pytest.fixture(scope="module")
def oracle(tower):
    return oracle_exits(tower.state_dict(), tower.config, seeded_images())


def test_oracle_reproduces_the_stored_exits(oracle):
    """The independent forward agrees with the stored values: the stored file is not just the model's echo."""
    stored = json.loads(STORED.read_text())
    assert stored["shape"] == list(oracle.shape)
    torch.testing.assert_close(oracle, torch.tensor(stored["exits"], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_full_pass_matches_the_oracle_and_the_stored_exits(tower, oracle, impl):
    with torch.no_grad():
        exits = tower(seeded_images(), impl=impl)
    stored = torch.tensor(json.loads(STORED.read_text())["exits"], dtype=torch.float64)
    torch.testing.assert_close(exits, oracle, rtol=0, atol=1e-12)
    torch.testing.assert_close(exits, stored, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_incremental_pass_with_early_exit_matches_the_oracle(tower, oracle, impl):
    """start + refine, samples leaving after stage 0 and 1: every exit that ran equals the oracle's."""
    state = tower.start(seeded_images(), impl=impl)
    tower.refine(state, active=[0, 2])
    tower.refine(state, active=[2])
    ran = state.embeddings[[0, 0, 1, 2, 2, 2], [0, 1, 0, 0, 1, 2]]
    want = oracle[[0, 0, 1, 2, 2, 2], [0, 1, 0, 0, 1, 2]]
    torch.testing.assert_close(ran, want, rtol=0, atol=1e-12)
    assert state.embeddings[[0, 1, 1], [2, 1, 2]].isnan().all()


def test_oracle_mask_and_sensitivity(tower, oracle):
    """The oracle's own mask is block-causal, and its exits move with the level embedding and ln_post."""
    assert block_causal_mask([2, 1]).tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    state = dict(tower.state_dict())
    for name in ("level_embedding", "ln_post.bias"):
        changed = {**state, name: torch.zeros_like(state[name])}
        assert (oracle_exits(changed, tower.config, seeded_images()) - oracle).abs().max() > 1e-3, name
