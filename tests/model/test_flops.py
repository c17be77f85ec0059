"""FLOP accounting: the analytic count, fvcore's count with our handles, and the published teacher figure."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import waveclip_kernels as wk
from waveclip import flops
from waveclip.config import WaveCLIPConfig
from waveclip_kernels.reference.attention import block_causal_mask


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def macs_to_flops(module, inputs, **kw) -> int:
    return round(flops.count_gflops(module, inputs, **kw) * 1e9)


def test_attention_pairs_match_the_mask():
    rng = random.Random(0)
    for _ in range(20):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))]
        assert flops.attention_pairs(sizes) == int(block_causal_mask(sizes).sum())
    assert flops.block_causal_attention_flops(2, 3, 8, [2, 3]) == 4 * 2 * 3 * 8 * (2 * 2 + 3 * 5)


def test_tokenizer_flops_by_hand_and_by_fvcore():
    # 4x4 px, L=1: colour 15 * 16 + Haar 3 FLOPs per element of 3 channels * 16 px.
    assert flops.tokenizer_flops((4, 4), 1) == 15 * 16 + 3 * 48
    assert flops.tokenizer_flops((4, 4), 1, "rgb") == 3 * 48
    # 16x32 px, L=2: levels read 3*16*32 then 3*8*16 elements.
    assert flops.tokenizer_flops((16, 32), 2) == 15 * 512 + 3 * (1536 + 384)
    x = torch.randn(3, 3, 16, 32)
    tokenize = _Fn(lambda x: wk.wavelet_tokenize(x, 2, (2, 4), impl="reference"))
    assert macs_to_flops(tokenize, (x,)) == 3 * flops.tokenizer_flops((16, 32), 2)
    tokens = wk.wavelet_tokenize(x, 2, (2, 4), color="rgb", impl="reference")
    detok = _Fn(lambda *t: wk.wavelet_detokenize(list(t), 2, (2, 4), "rgb", (16, 32), impl="reference"))
    assert macs_to_flops(detok, tuple(tokens)) == 3 * flops.tokenizer_flops((16, 32), 2, "rgb")


def test_sdpa_handle_dense_and_causal():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 5)
    dense = _Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert macs_to_flops(dense, (q, k, v)) == 2 * 2 * 3 * 7 * 11 * (8 + 5)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    causal = _Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert macs_to_flops(causal, (q, k, v)) == 2 * 2 * 3 * (6 * 7 // 2) * 16


def test_native_multi_head_attention_handle_matches_the_decomposed_count():
    # Under no_grad nn.MultiheadAttention takes a fused fast path; the count must not change.
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    module = _Fn(lambda x: mha(x, x, x, need_weights=False)[0])
    module.mha = mha
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        fused = flops.flop_count_analysis(module, (x,))
        fused_total = fused.total()
    with torch.enable_grad():
        decomposed = flops.flop_count_analysis(module, (x,))
        decomposed_total = decomposed.total()
    assert "_native_multi_head_attention" in fused.by_operator()
    assert "scaled_dot_product_attention" in decomposed.by_operator()
    assert fused_total == decomposed_total == 2 * (4 * 10 * 32 * 32 + 2 * 10 * 10 * 32)


def test_block_causal_handle():
    sizes = [3, 1, 4]
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    fn = _Fn(lambda q, k, v: wk.block_causal_attention(q, k, v, sizes, impl="reference"))
    assert macs_to_flops(fn, (q, k, v)) == flops.block_causal_attention_flops(2, 3, 16, sizes)


def _kv_step(q, kn, vn, kc, vc, lens):
    return wk.attention_with_kv_append(q, kn, vn, kc, vc, lens, impl="reference")


def test_kv_append_handle_reads_lengths_built_in_the_trace_or_given():
    B, H, n, D, n_max = 2, 3, 4, 8, 20
    q, kn, vn = (torch.randn(B, H, n, D) for _ in range(3))
    kc, vc = torch.randn(B, H, n_max, D), torch.randn(B, H, n_max, D)
    built = _Fn(lambda q, kn, vn, kc, vc: _kv_step(q, kn, vn, kc, vc, torch.full((q.shape[0],), 5)))
    assert macs_to_flops(built, (q, kn, vn, kc.clone(), vc.clone())) == 4 * B * H * n * (5 + n) * D
    given = _Fn(_kv_step)
    lens = torch.tensor([3, 9])
    got = macs_to_flops(given, (q, kn, vn, kc.clone(), vc.clone(), lens), cache_lens=[3, 9])
    assert got == 4 * H * n * ((3 + n) + (9 + n)) * D
    with pytest.warns(UserWarning, match="upper bound"):
        bound = macs_to_flops(given, (q, kn, vn, kc.clone(), vc.clone(), lens))
    assert bound == 4 * H * n * B * n_max * D


def test_default_preset_exit_costs_follow_the_design():
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    teacher = flops.teacher_gflops_analytic(cfg, layernorm=False)
    assert teacher == pytest.approx(35.13, rel=1e-3)  # open_clip's published figure, from the sizes alone
    percent = [100 * g / teacher for g in flops.exit_gflops(cfg, layernorm=False)]
    for got, design in zip(percent, (25, 49, 74, 100)):
        assert abs(got - design) < 1.5, percent
    gflops = flops.exit_gflops(cfg)
    assert gflops == sorted(gflops) and len(set(gflops)) == len(gflops)
    rows = flops.exit_table(cfg)
    assert [r["tokens"] for r in rows] == [50, 100, 150, 200]
    assert rows[-1]["percent_of_teacher"] == pytest.approx(100 * gflops[-1] / flops.teacher_gflops_analytic(cfg))


def test_stage_costs_add_up():
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16-448")
    costs = flops.stage_costs(cfg)
    assert [c.prefix for c in costs] == [197, 394, 591, 788]
    assert sum(c.total for c in costs) / 1e9 == pytest.approx(flops.exit_gflops(cfg)[-1])
    attention = sum(c.attention for c in costs)
    assert attention == cfg.layers * flops.block_causal_attention_flops(1, cfg.heads, cfg.head_dim, cfg.block_sizes)


def _tiny_model():
    from waveclip import WaveCLIP

    torch.manual_seed(0)
    return WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").eval()


def test_fvcore_matches_the_analytic_count_on_the_tiny_tower():
    model = _tiny_model()
    cfg = model.config
    x = torch.randn(3, 3, *cfg.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = flops.count_gflops(model, (x,)) / 3
        per_exit = flops.fvcore_exit_gflops(model, x)
    expected = flops.exit_gflops(cfg)
    assert full == pytest.approx(expected[-1], rel=1e-9)
    assert per_exit == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_fvcore_matches_the_analytic_count_on_the_default_tower():
    from waveclip import WaveCLIP

    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    model = WaveCLIP(cfg, impl="reference").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = flops.count_gflops(model, (torch.randn(1, 3, *cfg.image_size),))
    assert full == pytest.approx(flops.exit_gflops(cfg)[-1], rel=1e-9)


@pytest.mark.slow
def test_teacher_vit_b_16_matches_open_clip_published_figure():
    got = flops.teacher_gflops("ViT-B-16", 224)
    assert got == pytest.approx(35.13, rel=0.01)
    # fvcore counts LayerNorm; the analytic count with LayerNorm is exact.
    assert got == pytest.approx(flops.vit_gflops(224, 16, 768, 12, 4.0, 512), rel=1e-9)
