"""WaveCLIP tower: full pass, incremental pass with KV cache, per-sample early exit, causality."""

from __future__ import annotations

import pytest
import torch

import waveclip_kernels as wk
from waveclip import WaveCLIP, WaveCLIPConfig

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")


def images(batch, dtype=torch.float32, config=TINY):
    return torch.randn(batch, 3, *config.image_size, dtype=dtype)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def same_bits(a, b) -> bool:
    """Bitwise equality, NaNs included (caches are allocated uninitialised)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}
    return torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def run_incremental(model, x, **kwargs):
    state = model.start(x, **kwargs)
    for _ in range(model.config.levels):
        model.refine(state)
    return state


def test_forward_shapes_and_unit_exits(tiny_tower):
    model = tiny_tower()
    z = model(images(3))
    assert z.shape == (3, TINY.num_stages, TINY.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3, TINY.num_stages))


def test_config_geometry():
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    assert cfg.stage_dims() == [48, 144, 576, 2304]
    assert cfg.block_sizes == [50, 50, 50, 50]
    assert TINY.stage_dims() == [48, 144, 576]
    assert sum(TINY.stage_dims()) == 3 * (32 // 2) ** 2  # one grid cell's pixels, every stage together


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch", [1, 3])
def test_incremental_equals_full_pass(dtype, tol, batch, tiny_tower):
    model = tiny_tower(dtype)
    x = images(batch, dtype)
    with torch.no_grad():
        full = model(x)
    state = model.start(x)
    assert state.stage == 0 and state.cache_lens.tolist() == [TINY.block_sizes[0]] * batch
    torch.testing.assert_close(state.latest(), full[:, 0], rtol=0, atol=tol)
    for s in range(1, TINY.num_stages):
        z = model.refine(state)
        assert rel_err(z, full[:, s]) <= tol
    assert state.done and state.cache_lens.tolist() == [sum(TINY.block_sizes)] * batch
    assert rel_err(state.embeddings, full) <= tol


def test_incremental_pass_runs_under_autocast(tiny_tower):
    """Under bf16 autocast (the command line's amp) the caches take the dtype the QKV projection yields,
    and the exits of start + refine agree with the autocast full pass to bf16 accuracy."""
    model = tiny_tower(torch.float32)
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        state = model.start(x)
        while not state.done:
            model.refine(state)
    assert state.keys.dtype == state.values.dtype == torch.bfloat16
    assert state.embeddings.dtype == torch.float32
    assert rel_err(state.embeddings, full.float()) <= 3e-2


def test_incremental_with_a_non_square_grid(tiny_tower):
    model = tiny_tower(torch.float64, image_size=(24, 48), grid=(3, 2), levels=3, thresholds=(0.5, 0.5, 0.5))
    x = images(2, torch.float64, model.config)
    with torch.no_grad():
        full = model(x)
    assert full.shape == (2, 4, TINY.embed_dim)
    assert rel_err(run_incremental(model, x).embeddings, full) <= 1e-12


@pytest.mark.parametrize(
    "dtype, tol, impl",
    [(torch.float32, 1e-5, "auto"), (torch.float64, 1e-12, "auto"), (torch.float64, 1e-12, "reference")],
)
def test_batched_early_exit_equals_one_by_one(dtype, tol, impl, tiny_tower):
    model = tiny_tower(dtype)
    model.impl = impl
    x = images(5, dtype)
    state = model.start(x)
    model.refine(state, active=torch.tensor([True, False, True, True, True]))  # sample 1 exits after stage 0
    assert state.active.tolist() == [0, 2, 3, 4]
    keys_before = state.keys.clone()
    model.refine(state, active=[4, 0])  # samples 2 and 3 exit after stage 1 (index order does not matter)
    assert state.active.tolist() == [0, 4]
    assert state.last_stage.tolist() == [2, 0, 1, 1, 2]
    assert state.cache_lens.tolist() == [15, 5, 10, 10, 15]
    # Rows of samples that exited are never written again; running rows only gain their new block.
    untouched = torch.ones_like(state.keys, dtype=torch.bool)
    untouched[:, [0, 4], :, 10:15] = False
    assert same_bits(state.keys[untouched], keys_before[untouched])
    for b in range(5):
        alone = run_incremental(model, x[b : b + 1]).embeddings[0]
        ran = state.last_stage[b] + 1
        assert rel_err(state.embeddings[b, :ran], alone[:ran]) <= tol
        assert state.embeddings[b, ran:].isnan().all()


def test_refine_rejects_bad_active_sets_before_writing(tiny_tower):
    model = tiny_tower()
    state = model.start(images(3))
    model.refine(state, active=[0, 2])
    keys, lens = state.keys.clone(), state.cache_lens.clone()
    with pytest.raises(ValueError, match="subset"):
        model.refine(state, active=[1])  # sample 1 exited after stage 0
    with pytest.raises(ValueError, match="duplicate"):
        model.refine(state, active=[0, 0])
    with pytest.raises(ValueError, match="shape"):
        model.refine(state, active=torch.tensor([True, False]))
    assert same_bits(state.keys, keys) and torch.equal(state.cache_lens, lens) and state.stage == 1
    model.refine(state)
    with pytest.raises(ValueError, match="every stage has run"):
        model.refine(state)


def test_everyone_exiting_stops_the_state_where_it_is(tiny_tower):
    """refine(active=[]) exits everyone without running or advancing; a later refine is an error."""
    model = tiny_tower()
    state = model.start(images(2))
    keys = state.keys.clone()
    z = model.refine(state, active=[])
    assert tuple(z.shape) == (0, TINY.embed_dim) and state.stage == 0 and state.done
    assert state.cache_lens.tolist() == [5, 5] and state.last_stage.tolist() == [0, 0]
    assert same_bits(state.keys, keys) and state.embeddings[:, 1:].isnan().all()
    with pytest.raises(ValueError, match="every sample has exited"):
        model.refine(state)
    assert state.stage == 0 and state.cache_lens.tolist() == [5, 5]


@pytest.mark.parametrize("s", [0, 1])
def test_block_causality_token_level_is_bit_exact(s, tiny_tower):
    """Changing the tokens of stages > s leaves exits <= s bit-identical, in both passes."""
    model = tiny_tower()
    tokens = model.tokenize(images(2))
    changed = [t if i <= s else torch.randn_like(t) for i, t in enumerate(tokens)]
    with torch.no_grad():
        a, b = model.forward_tokens(tokens), model.forward_tokens(changed)
    assert torch.equal(a[:, : s + 1], b[:, : s + 1])
    assert not torch.equal(a[:, s + 1 :], b[:, s + 1 :])


def test_causality_under_finer_image_detail(tiny_tower):
    """Images that differ only in their finest wavelet detail give the same coarser exits."""
    model = tiny_tower(torch.float64)
    cfg = model.config
    tokens = wk.wavelet_tokenize(images(2, torch.float64), cfg.levels, cfg.grid, cfg.color)
    detail = tokens[:-1] + [torch.randn_like(tokens[-1])]
    x0 = wk.wavelet_detokenize(tokens, cfg.levels, cfg.grid, cfg.color, image_size=cfg.image_size)
    x1 = wk.wavelet_detokenize(detail, cfg.levels, cfg.grid, cfg.color, image_size=cfg.image_size)
    assert (x0 - x1).abs().max() > 0.1
    with torch.no_grad():
        a, b = model(x0), model(x1)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-12)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3
    state0, state1 = model.start(x0), model.start(x1)
    model.refine(state0), model.refine(state1)
    torch.testing.assert_close(state0.embeddings[:, :2], state1.embeddings[:, :2], rtol=0, atol=1e-12)


def test_impl_is_passed_through_to_the_ops(tiny_tower):
    x = images(2)
    model = tiny_tower()
    with torch.no_grad():
        ref = model(x, impl="reference")
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match='impl="cuda" cannot run'):
            model(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        WaveCLIP(TINY, impl="fast")


def test_constructor_accepts_only_impls_that_run_every_op(monkeypatch, tiny_tower):
    """An explicit impl is refused at construction unless `available_impls` lists it for every op."""
    for impl in ("cpu", "cuda", "triton", "reference"):
        runs = wk.available_impls("cuda" if impl == "cuda" else "cpu")
        if all(impl in runs[op] for op in ("wavelet_tokenize", "block_causal_attention", "attention_with_kv_append")):
            model = tiny_tower()
            model.impl = impl
            state = model.start(images(1))  # every method runs
            model.refine(state)
            WaveCLIP(TINY, impl=impl)
        else:
            with pytest.raises(RuntimeError, match=f'impl="{impl}" cannot run every op'):
                WaveCLIP(TINY, impl=impl)
    # The check reads available_impls: once an op no longer lists an impl, the constructor refuses it.
    real = wk.available_impls
    monkeypatch.setattr(wk, "available_impls", lambda d="cpu": {**real(d), "attention_with_kv_append": ["reference"]})
    with pytest.raises(RuntimeError, match=r"attention_with_kv_append runs with \['reference'\]"):
        WaveCLIP(TINY, impl="cpu")


@pytest.mark.parametrize("size", [(30, 32), (32, 40), (24, 24), (16, 32), (96, 96), (64, 32)])
def test_image_size_that_does_not_fit_raises(size, tiny_tower):
    model = tiny_tower()
    with pytest.raises(ValueError, match="takes 32x32, 16x16, 8x8"):
        model(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match="takes 32x32, 16x16, 8x8"):
        model.start(torch.randn(1, 3, *size))


def test_bad_inputs_raise_clearly(tiny_tower):
    model = tiny_tower()
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    tokens = model.tokenize(images(1))
    with pytest.raises(ValueError, match="expected 1 to 3 stage token tensors"):
        model.forward_tokens([])
    with pytest.raises(ValueError, match="expected 1 to 3 stage token tensors"):
        model.forward_tokens([*tokens, tokens[2]])
    with pytest.raises(ValueError, match=r"tokens\[1\] must be a float tensor of shape"):
        model.forward_tokens([tokens[0], tokens[2], tokens[2]])


def test_preset_config_validation():
    with pytest.raises(ValueError, match="unknown preset"):
        WaveCLIPConfig.from_preset("waveclip-huge")
    with pytest.raises(ValueError, match="thresholds"):
        WaveCLIPConfig.from_preset("waveclip-tiny", thresholds=(0.5,))
