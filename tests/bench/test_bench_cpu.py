"""pytest-benchmark suites for the CPU paths (not collected by the main test suite).

    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-enable
    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-enable -k tokenizer --benchmark-json out.json

Every provider of `bench.bench_tokenizer` and `bench.bench_attention` is timed on the same inputs, and
its output is checked against the float64 reference first, so a fast wrong answer fails. Without
--benchmark-enable each provider runs once (a smoke check). Triton is excluded on the CPU (its
interpreter is far too slow to time); providers that do not run here are skipped with the reason.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import waveclip_kernels as wk
from bench import bench_attention, bench_tokenizer
from waveclip_kernels.reference import attention as ref

DEVICE = torch.device("cpu")
TOKENIZER_CASE = bench_tokenizer.Case(8, 224)
ATTENTION_CASE = bench_attention.Case(2, label="224 preset")
TOKENIZER_PROVIDERS = ["waveclip:cpu", "waveclip:reference", "pytorch_wavelets", "ptwt", "copy"]
FULL_PROVIDERS = [
    "waveclip:reference",
    "sdpa_mask:math",
    "sdpa_mask:flash",
    "sdpa_mask:auto",
    "sdpa_dense",
    "sdpa_per_stage",
    "flex_compiled",
]
STEP_PROVIDERS = ["waveclip:cpu", "waveclip:reference", "copy+sdpa"]


def _pick(providers: list[dict], name: str) -> dict:
    p = next(p for p in providers if p["provider"] == name)
    if "fn" not in p:
        pytest.skip(f"{name}: {p.get('status')}: {p.get('note')}")
    return p


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    x = torch.randn(TOKENIZER_CASE.batch, 3, TOKENIZER_CASE.size, TOKENIZER_CASE.size)
    expected = wk.wavelet_tokenize(x.double(), TOKENIZER_CASE.levels, TOKENIZER_CASE.grid, impl="reference")
    return x, expected


@pytest.mark.parametrize("name", TOKENIZER_PROVIDERS)
def test_tokenizer(benchmark, images, name):
    x, expected = images
    p = _pick(bench_tokenizer.providers(x, TOKENIZER_CASE, DEVICE), name)
    got = p["fn"]()
    if name == "copy":
        assert torch.equal(got, x)
    else:
        assert max((g.double() - e).abs().max().item() for g, e in zip(got, expected)) < 1e-5
    benchmark.extra_info.update(TOKENIZER_CASE.params() | {"backend": p["backend"]})
    benchmark(p["fn"])


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    c = ATTENTION_CASE
    q, k, v = (torch.randn(c.batch, c.heads, c.stages * c.stage_tokens, c.head_dim) for _ in range(3))
    return q, k, v, ref.block_causal_attention(q.double(), k.double(), v.double(), c.block_sizes)


@pytest.mark.parametrize("name", FULL_PROVIDERS)
def test_attention_full_pass(benchmark, qkv, name):
    q, k, v, expected = qkv
    p = _pick(bench_attention.full_pass_providers(q, k, v, ATTENTION_CASE.block_sizes, DEVICE), name)
    with p.get("context", contextlib.nullcontext)():
        got = p["fn"]()
        if not p.get("dense"):
            assert (got.double() - expected).abs().max().item() < 1e-5
        benchmark.extra_info.update(ATTENTION_CASE.params() | {"backend": p["backend"]})
        benchmark(p["fn"])


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("name", STEP_PROVIDERS)
def test_attention_incremental_step(benchmark, name, stage):
    torch.manual_seed(stage)
    c = ATTENTION_CASE
    B, H, n, D = c.batch, c.heads, c.stage_tokens, c.head_dim
    cached = stage * n
    k_cache, v_cache = (torch.randn(B, H, c.stages * n, D) for _ in range(2))
    q, k_new, v_new = (torch.randn(B, H, n, D) for _ in range(3))
    lens = torch.full((B,), cached, dtype=torch.int32)
    expected = ref.attention_with_kv_append(
        q.double(), k_new.double(), v_new.double(), k_cache.double(), v_cache.double(), lens
    )
    providers = bench_attention.step_providers(q, k_new, v_new, k_cache, v_cache, lens, cached, DEVICE)
    p = _pick(providers, name)
    assert (p["fn"]().double() - expected).abs().max().item() < 1e-5
    assert torch.equal(k_cache[:, :, cached : cached + n], k_new)
    benchmark.extra_info.update(c.params() | {"backend": p["backend"], "cached": cached})
    benchmark(p["fn"])
