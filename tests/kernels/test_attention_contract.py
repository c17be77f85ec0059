"""The attention ops' contract on every impl that runs here: refusals before any write, the checked
KV-append plan, torch.compile(fullgraph=True) and PyTorch's FlopCounterMode."""

import functools
import itertools

import pytest
import torch
from tolerances import assert_close
from torch.utils.flop_counter import FlopCounterMode

import waveclip_kernels as wk
from waveclip import WaveCLIP, WaveCLIPConfig
from waveclip.flops import block_causal_attention_flops, exit_gflops
from waveclip_kernels import kvappend

KV_IMPLS = wk.available_impls("cpu")["attention_with_kv_append"]


def _kv(B=2, H=2, n=3, D=4, B_cache=3, n_max=10):
    q, k_new, v_new = (torch.randn(B, H, n, D) for _ in range(3))
    return q, k_new, v_new, torch.randn(B_cache, H, n_max, D), torch.randn(B_cache, H, n_max, D)


def _aliased(case):
    """Arguments of one aliasing case: every one overlaps memory that the append writes or reads."""
    q, k_new, v_new, k_cache, v_cache = _kv()
    if case == "k_cache is v_cache":
        v_cache = k_cache
    elif case == "v_cache inside k_cache":
        v_cache = k_cache[:, :, :]
    elif case == "stride-0 cache rows":
        k_cache = torch.randn(1, 2, 10, 4).expand(3, 2, 10, 4)
    elif case == "stride-0 cache positions":
        v_cache = torch.randn(3, 2, 1, 4).expand(3, 2, 10, 4)
    elif case == "q views the rows written":
        q = k_cache[:2, :, 1:4]
    elif case == "k_new views the rows written":
        k_new = v_cache[:2, :, 1:4]
    elif case == "v_new views k_cache":
        v_new = k_cache[1:3, :, 5:8]
    return q, k_new, v_new, k_cache, v_cache


ALIAS_CASES = [
    "k_cache is v_cache",
    "v_cache inside k_cache",
    "stride-0 cache rows",
    "stride-0 cache positions",
    "q views the rows written",
    "k_new views the rows written",
    "v_new views k_cache",
]


@pytest.mark.parametrize("impl", KV_IMPLS)
@pytest.mark.parametrize("case", ALIAS_CASES)
def test_kv_append_refuses_aliased_storage_before_writing(case, impl):
    q, k_new, v_new, k_cache, v_cache = _aliased(case)
    before = [t.clone() for t in (q, k_new, v_new, k_cache, v_cache)]
    with pytest.raises(ValueError, match=r"shares? memory"):
        wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, torch.tensor([1, 0]), impl=impl)
    for t, b in zip((q, k_new, v_new, k_cache, v_cache), before):
        assert torch.equal(t, b)


def test_disjoint_views_of_one_buffer_are_accepted():
    """Caches and inputs carved out of one buffer without overlap are fine (and exact)."""
    buf = torch.randn(4, 3, 2, 10, 4)
    k_cache, v_cache = buf[0], buf[1]
    q, k_new, v_new = buf[2][:2, :, :3], buf[3][:2, :, :3], buf[3][:2, :, 5:8]
    out = wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, [1, 0], impl="reference")
    assert torch.equal(k_cache[0, :, 1:4], k_new[0]) and torch.equal(v_cache[1, :, 0:3], v_new[1])
    assert out.shape == q.shape


@pytest.mark.parametrize("impl", KV_IMPLS)
@pytest.mark.parametrize(
    "lens,error,match",
    [
        (2, TypeError, "cache_lens must be a \\(2,\\) int tensor or a sequence of 2 ints, got int"),
        ("01", TypeError, "got str"),
        ([0, 1.5], TypeError, "cache_lens must hold ints"),
        ([0, -1], ValueError, "cache_lens must be >= 0: row 1 \\(cache row 1\\) has cache_lens=-1"),
        (torch.tensor([-2, 0]), ValueError, "cache_lens must be >= 0: row 0"),
        ([0, 8], ValueError, "cache overflow: row 1"),
    ],
)
def test_kv_append_bad_lengths_are_named(lens, error, match, impl):
    q, k_new, v_new, k_cache, v_cache = _kv()
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(error, match=match):
        wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, lens, impl=impl)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_head_dim_zero_is_refused():
    q = torch.randn(1, 2, 5, 0)
    with pytest.raises(ValueError, match="head dim \\(dim 3\\) must be at least 1"):
        wk.block_causal_attention(q, q, q, [2, 3])
    cache = torch.randn(1, 2, 8, 0)
    with pytest.raises(ValueError, match="head dim \\(dim 3\\) must be at least 1"):
        wk.attention_with_kv_append(q, q.clone(), q.clone(), cache, cache.clone(), [0])


# ------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("impl", KV_IMPLS)
def test_a_plan_gives_the_same_result_as_tensors(impl):
    q, k_new, v_new, k_cache, v_cache = _kv(B=2, B_cache=4)
    lens, index = torch.tensor([2, 5]), torch.tensor([3, 0])
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    out_t = wk.attention_with_kv_append(q, k_new, v_new, *caches[0], lens, index, impl=impl)
    plan = wk.kv_append_plan(lens, index, 3, k_cache)
    out_p = wk.attention_with_kv_append(q, k_new, v_new, *caches[1], plan, impl=impl)
    assert torch.equal(out_t, out_p)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert plan.lens == (2, 5) and plan.rows == (3, 0)


def test_a_plan_is_not_checked_again(monkeypatch):
    """With a plan no index tensor is read and no value re-checked (the calls would raise here)."""
    q, k_new, v_new, k_cache, v_cache = _kv()
    plan = wk.kv_append_plan([1, 4], None, 3, k_cache)

    def forbidden(*args, **kwargs):
        raise AssertionError("a planned call re-read or re-checked the lengths")

    monkeypatch.setattr(kvappend, "host_lens_rows", forbidden)
    monkeypatch.setattr(kvappend, "check_plan_values", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    for impl in KV_IMPLS:
        if impl != "reference":  # the readable reference reads its index tensors itself
            wk.attention_with_kv_append(q, k_new, v_new, k_cache.clone(), v_cache.clone(), plan, impl=impl)


def test_a_plan_must_fit_the_call():
    q, k_new, v_new, k_cache, v_cache = _kv()
    plan = wk.kv_append_plan([1, 4], None, 3, k_cache)
    with pytest.raises(ValueError, match="the plan was made for"):
        wk.attention_with_kv_append(q[:, :, :2], k_new[:, :, :2], v_new[:, :, :2], k_cache, v_cache, plan)
    with pytest.raises(ValueError, match="the plan was made for"):
        wk.attention_with_kv_append(q, k_new, v_new, k_cache[:, :, :6], v_cache[:, :, :6], plan)
    with pytest.raises(ValueError, match="rows come from the plan"):
        wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, plan, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="duplicate cache rows \\[2\\]"):
        wk.kv_append_plan([0, 0], [2, 2], 3, k_cache)
    with pytest.raises(ValueError, match="cache overflow: row 0"):
        wk.kv_append_plan([8], None, 3, k_cache)


# ----------------------------------------------------------------------------- torch.compile


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


def test_every_op_compiles_fullgraph_with_the_default_impl():
    x, q = torch.randn(1, 3, 16, 16), torch.randn(2, 2, 7, 8)

    def ops(x, q, k_cache, v_cache, lens):
        tokens = wk.wavelet_tokenize(x, 2, 2)
        image = wk.wavelet_detokenize(tokens, 2, 2, image_size=(16, 16))
        full = wk.block_causal_attention(q, q * 2, q * 3, [3, 4])
        step = wk.attention_with_kv_append(q[:, :, :3], q[:, :, 3:6], q[:, :, 4:7], k_cache, v_cache, lens)
        return image, full, step

    k_cache, v_cache = torch.randn(3, 2, 9, 8), torch.randn(3, 2, 9, 8)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    lens = torch.tensor([2, 6])
    eager = ops(x, q, *caches[0], lens)
    compiled = _compiled(ops)(x, q, *caches[1], lens)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_kv_append_with_a_plan_compiles_fullgraph():
    q, k_new, v_new, k_cache, v_cache = _kv()
    plan = wk.kv_append_plan(torch.tensor([1, 4]), torch.tensor([2, 0]), 3, k_cache)

    def step(q, k_cache, v_cache):
        return wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, plan)

    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    assert torch.equal(step(q, *caches[0]), _compiled(step)(q, *caches[1]))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_tiny_tower_compiles_fullgraph(tiny_tower):
    """forward, start and refine, each captured whole and run through AOT autograd (aot_eager)."""
    model = tiny_tower()
    images = torch.randn(2, 3, *model.config.image_size)
    with torch.no_grad():
        assert torch.equal(_compiled(model)(images), model(images))

    def run(start, refine):
        state = start(images)
        exits = [state.latest()]
        while not state.done:
            exits.append(refine(state))
        return exits

    eager = run(model.start, model.refine)
    torch._dynamo.reset()
    start = torch.compile(model.start, backend="aot_eager", fullgraph=True)
    refine = torch.compile(model.refine, backend="aot_eager", fullgraph=True)
    compiled = run(start, refine)
    assert len(eager) == model.config.num_stages
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# ---------------------------------------------------------------------------- FlopCounterMode


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_counts_the_attention_ops():
    q = torch.randn(2, 3, 10, 8)
    assert _flops(lambda: wk.block_causal_attention(q, q, q, [4, 1, 5])) == block_causal_attention_flops(
        2, 3, 8, [4, 1, 5]
    )
    qn, cache = torch.randn(2, 3, 4, 8), torch.randn(3, 3, 12, 8)
    lens = [5, 2]
    expected = 2 * 3 * 4 * (sum(lens) + 2 * 4) * (8 + 8)
    for cache_lens in (lens, torch.tensor(lens), wk.kv_append_plan(lens, None, 4, cache)):
        call = functools.partial(wk.attention_with_kv_append, qn, qn, qn, cache.clone(), cache.clone(), cache_lens)
        assert _flops(call) == expected


def test_flop_counter_sees_the_b16_tower_and_every_stage():
    """The B/16 tower (random weights, one image): the full pass and each start/refine increment equal
    the analytic count (without LayerNorm and the tokenizer, which FlopCounterMode does not count)."""
    config = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    model = WaveCLIP(config).eval()
    images = torch.randn(1, 3, *config.image_size)
    expected = exit_gflops(config, layernorm=False, tokenizer=False)
    with torch.no_grad():
        full = _flops(lambda: model(images)) / 1e9
    assert full == pytest.approx(expected[-1], rel=1e-9)
    assert full == pytest.approx(35.13, abs=0.01)
    state = {}
    steps = [_flops(lambda: state.setdefault("s", model.start(images)))]
    while not state["s"].done:
        steps.append(_flops(functools.partial(model.refine, state["s"])))
    assert [c / 1e9 for c in itertools.accumulate(steps)] == pytest.approx(expected, rel=1e-9)


def test_kv_append_result_matches_the_reference_on_every_impl():
    q, k_new, v_new, k_cache, v_cache = _kv(B=3, B_cache=4, n=5, D=8, n_max=16)
    lens, index = [4, 0, 11], [2, 3, 0]
    ref_caches = k_cache.clone(), v_cache.clone()
    expected = wk.attention_with_kv_append(q, k_new, v_new, *ref_caches, lens, index, impl="reference")
    for impl in KV_IMPLS:
        caches = k_cache.clone(), v_cache.clone()
        out = wk.attention_with_kv_append(q, k_new, v_new, *caches, lens, index, impl=impl)
        assert_close(out, expected)
        assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
