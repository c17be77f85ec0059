"""The op API's documented defaults, listings and exact error messages (docs/design.md section 3)."""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import assert_close

import waveclip_kernels as wk
from waveclip_kernels import reference as ref


def test_available_impls_defaults_to_the_cpu_and_lists_each_impl_once():
    impls = wk.available_impls()
    assert impls == wk.available_impls("cpu")
    for op, names in impls.items():
        assert len(names) == len(set(names)), (op, names)
        assert set(names) <= set(wk.IMPLS[1:])
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert "triton" in names, op  # runs here (under the interpreter), never picked by "auto"


def test_available_impls_on_a_device_without_backends_is_the_reference():
    assert wk.available_impls("meta") == {op: ["reference"] for op in wk.OPS}
    assert wk.resolve_impl("auto", "wavelet_tokenize", torch.device("meta")) == "reference"


def test_every_op_defaults_to_auto():
    x = torch.randn(1, 3, 8, 8)
    tokens = wk.wavelet_tokenize(x, 1, 2)
    assert_close(wk.wavelet_detokenize(tokens, 1, 2, image_size=8), x)
    q = torch.randn(1, 2, 5, 4)
    assert_close(wk.block_causal_attention(q, q, q, [2, 3]), ref.block_causal_attention(q, q, q, [2, 3]))
    cache = torch.randn(1, 2, 8, 4)
    expected = ref.attention_with_kv_append(q, q, q, cache.clone(), cache.clone(), torch.tensor([1]))
    assert_close(wk.attention_with_kv_append(q, q, q, cache.clone(), cache.clone(), [1]), expected)


@pytest.mark.parametrize("levels", [True, 2.0, -1])
def test_levels_must_be_an_int(levels):
    with pytest.raises(ValueError, match=r"^levels must be an int"):
        wk.wavelet_tokenize(torch.randn(1, 3, 8, 8), levels, 1)


def test_tokenize_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"^images must have 4 dimensions, got shape \(3, 8, 8\)$"):
        wk.wavelet_tokenize(torch.randn(3, 8, 8), 1, 1)
    with pytest.raises(TypeError, match=r"^images must be float16, bfloat16, float32 or float64"):
        wk.wavelet_tokenize(torch.zeros(1, 3, 8, 8, dtype=torch.int32), 1, 1)


def test_detokenize_a_non_square_image_on_a_non_square_grid():
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 2, (2, 3), impl="reference")
    assert_close(wk.wavelet_detokenize(tokens, 2, (2, 3), image_size=(16, 24), impl="reference"), x)


def test_detokenize_messages_name_the_token_tensor():
    tokens = wk.wavelet_tokenize(torch.randn(2, 3, 16, 16), 2, 2, impl="reference")
    with pytest.raises(ValueError, match=r"^tokens\[1\] must have 3 dimensions"):
        wk.wavelet_detokenize([tokens[0], tokens[1][0], tokens[2]], 2, 2, image_size=16)
    with pytest.raises(TypeError, match=r"^tokens\[2\] has dtype torch\.float64 but tokens\[0\] has torch\.float32$"):
        wk.wavelet_detokenize([tokens[0], tokens[1], tokens[2].double()], 2, 2, image_size=16)
    with pytest.raises(TypeError, match=r"^tokens\[1\] has dtype torch\.float32 but tokens\[0\] has torch\.float64$"):
        wk.wavelet_detokenize([tokens[0].double(), tokens[1], tokens[2]], 2, 2, image_size=16)
    with pytest.raises(ValueError, match=r"^tokens\[1\] must have shape \(1, 4, 36\)"):
        wk.wavelet_detokenize([tokens[0][:1], tokens[1], tokens[2]], 2, 2, image_size=16)


def _kv(**change):
    q = torch.randn(2, 2, 3, 4)
    args = dict(
        q=q,
        k_new=torch.randn(2, 2, 3, 4),
        v_new=torch.randn(2, 2, 3, 4),
        k_cache=torch.randn(3, 2, 8, 4),
        v_cache=torch.randn(3, 2, 8, 4),
        cache_lens=[0, 1],
    )
    return {**args, **change}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"q": torch.randn(2, 3, 4)}, ValueError, r"^q must have 4 dimensions"),
        ({"k_new": torch.randn(2, 2, 3, 4).double()}, TypeError, r"^k_new has dtype torch\.float64 but q has"),
        ({"v_new": torch.randn(2, 2, 3, 4).double()}, TypeError, r"^v_new has dtype torch\.float64 but q has"),
        ({"k_cache": torch.randn(3, 8, 4)}, ValueError, r"^k_cache must have 4 dimensions"),
        ({"v_cache": torch.randn(3, 8, 4)}, ValueError, r"^v_cache must have 4 dimensions"),
        ({"k_cache": torch.randn(3, 2, 8, 4).double()}, TypeError, r"^k_cache has dtype torch\.float64 but q has"),
        ({"v_cache": torch.randn(3, 2, 8, 4).double()}, TypeError, r"^v_cache has dtype torch\.float64 but q has"),
        ({"cache_lens": torch.tensor([0, 1], device="meta")}, ValueError, "^cache_lens is on meta but q is on cpu$"),
        ({"cache_lens": [0, 6]}, ValueError, r"appending 3 needs 9 slots but N_max=8$"),
    ],
    ids=[
        "q-ndim",
        "k_new-dtype",
        "v_new-dtype",
        "k_cache-ndim",
        "v_cache-ndim",
        "k_cache-dtype",
        "v_cache-dtype",
        "lens-device",
        "overflow-count",
    ],
)
def test_kv_append_messages(change, error, match):
    with pytest.raises(error, match=match):
        wk.attention_with_kv_append(**_kv(**change), impl="reference")


def test_kv_append_names_only_the_duplicated_rows():
    args = _kv(q=torch.randn(3, 2, 3, 4), k_new=torch.randn(3, 2, 3, 4), v_new=torch.randn(3, 2, 3, 4))
    with pytest.raises(ValueError, match=r"duplicate cache rows \[1\]:"):
        wk.attention_with_kv_append(**{**args, "cache_lens": [0, 0, 0]}, batch_index=[0, 1, 1], impl="reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_list_cache_lens_on_cuda():
    """A list of lengths becomes a tensor on q's device."""
    args = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in _kv().items()}
    assert wk.attention_with_kv_append(**args, impl="reference").is_cuda
