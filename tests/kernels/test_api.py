"""The public API: dispatch, clear errors before anything is written, torch.library registration."""

import subprocess
import sys
import textwrap

import pytest
import torch

import waveclip_kernels as wk
from waveclip_kernels import _library


def test_available_impls_lists_reference_everywhere():
    impls = wk.available_impls("cpu")
    assert set(impls) == set(wk.OPS)
    assert all("reference" in v for v in impls.values())
    assert all("cuda" not in v for v in impls.values())


def test_explicit_impl_that_cannot_run_raises():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match='impl="cuda" cannot run'):
        wk.wavelet_tokenize(x, 1, 1, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        wk.wavelet_tokenize(x, 1, 1, impl="fast")


def test_auto_picks_an_available_impl():
    chosen = wk.resolve_impl("auto", "block_causal_attention", torch.device("cpu"))
    assert chosen == wk.available_impls("cpu")["block_causal_attention"][0]
    chosen = wk.resolve_impl("auto", "wavelet_tokenize", torch.device("cpu"))
    assert chosen == wk.available_impls("cpu")["wavelet_tokenize"][0]


@pytest.mark.parametrize(
    "images,kwargs,error,match",
    [
        (torch.randn(3, 32, 32), {}, ValueError, "4 dimensions"),
        (torch.randn(1, 4, 32, 32), {}, ValueError, "3 channels"),
        (torch.randint(0, 255, (1, 3, 32, 32)), {}, TypeError, "float16, bfloat16, float32 or float64"),
        (torch.randn(1, 3, 33, 32), {}, ValueError, "nearest valid heights: 32 or 40"),
        (torch.randn(1, 3, 32, 30), {}, ValueError, "nearest valid widths: 24 or 32"),
        (torch.randn(1, 3, 4, 32), {}, ValueError, "nearest valid heights: 8$"),
        (torch.randn(1, 3, 32, 32), {"levels": -1}, ValueError, "levels must be an int >= 0"),
        (torch.randn(1, 3, 32, 32), {"levels": True}, ValueError, "levels must be an int >= 0"),
        (torch.randn(1, 3, 32, 32), {"levels": 1.0}, ValueError, "levels must be an int >= 0"),
        (torch.randn(1, 3, 32, 32), {"grid": (2, 0)}, ValueError, "grid must be"),
        (torch.randn(1, 3, 32, 32), {"color": "hsv"}, ValueError, "color must be"),
        (torch.randn(1, 3, 32, 32), {"out_dtype": torch.int8}, TypeError, "out_dtype"),
    ],
)
def test_tokenize_bad_input(images, kwargs, error, match):
    args = {"levels": 2, "grid": 2, **kwargs}
    with pytest.raises(error, match=match):
        wk.wavelet_tokenize(images, impl="reference", **args)


def test_detokenize_bad_input():
    tokens = wk.wavelet_tokenize(torch.randn(1, 3, 16, 16), 2, 2, impl="reference")
    with pytest.raises(ValueError, match="levels \\+ 1 = 4"):
        wk.wavelet_detokenize(tokens, 3, 2, impl="reference")
    with pytest.raises(ValueError, match="tokens\\[1\\] must have shape"):
        wk.wavelet_detokenize([tokens[0], tokens[2], tokens[1]], 2, 2, image_size=16, impl="reference")
    with pytest.raises(TypeError, match="tokens\\[2\\] has dtype"):
        wk.wavelet_detokenize([tokens[0], tokens[1], tokens[2].double()], 2, 2, impl="reference")


def test_attention_bad_input():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="sum to N=6"):
        wk.block_causal_attention(q, q, q, [3, 2], impl="reference")
    with pytest.raises(ValueError, match="sum to N=6"):
        wk.block_causal_attention(q, q, q, [6, 0], impl="reference")
    with pytest.raises(TypeError, match=r"k has dtype torch\.float64 but q has torch\.float32"):
        wk.block_causal_attention(q, q.double(), q, [6], impl="reference")
    with pytest.raises(ValueError, match="4 dimensions"):
        wk.block_causal_attention(q[0], q[0], q[0], [6], impl="reference")
    with pytest.raises(ValueError, match="heads and head dim"):
        wk.block_causal_attention(q, torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4), [6], impl="reference")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        wk.block_causal_attention(q, q.to("meta"), q, [6], impl="reference")


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"batch_index": torch.tensor([1, 1])}, ValueError, "duplicate cache rows \\[1\\]"),
        ({"batch_index": torch.tensor([0, 3])}, ValueError, "must lie in \\[0, 3\\)"),
        ({"batch_index": torch.tensor([0.0, 1.0])}, TypeError, "batch_index must hold int32 or int64"),
        ({"cache_lens": torch.tensor([0, 7])}, ValueError, "cache overflow: row 1"),
        ({"cache_lens": torch.tensor([-1, 0])}, ValueError, "cache_lens must be >= 0: row 0"),
        ({"cache_lens": torch.tensor([0])}, ValueError, "cache_lens must have shape \\(2,\\)"),
        ({"k_cache": torch.randn(3, 2, 8, 4).double()}, TypeError, "k_cache has dtype"),
        ({"v_cache": torch.randn(3, 2, 9, 4)}, ValueError, "one shape"),
        ({"k_cache": torch.randn(3, 4, 8, 4), "v_cache": torch.randn(3, 4, 8, 4)}, ValueError, "heads"),
        ({"k_new": torch.randn(2, 2, 3, 4), "v_new": torch.randn(2, 2, 3, 4)}, ValueError, "one shape"),
    ],
)
def test_kv_append_bad_input_writes_nothing(change, error, match, kv_case):
    case = kv_case(2, 2, 2, 4, 3, 8, [0, 1], dtype=torch.float32)
    names = ("q", "k_new", "v_new", "k_cache", "v_cache", "cache_lens")
    args = dict(zip(names, case.args()))
    args.update(change)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(error, match=match):
        wk.attention_with_kv_append(**args, impl="reference")
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_kv_append_batch_larger_than_cache_needs_batch_index(kv_case):
    case = kv_case(2, 2, 2, 4, 1, 8, [0, 0], dtype=torch.float32)
    with pytest.raises(ValueError, match="pass batch_index"):
        wk.attention_with_kv_append(*case.args()[:5], [0, 0], impl="reference")


def test_kv_append_accepts_list_lens_and_empty_batch(kv_case):
    case = kv_case(0, 2, 2, 4, 3, 8, [], dtype=torch.float32)
    out = wk.attention_with_kv_append(*case.args()[:5], [], impl="reference")
    assert out.shape == (0, 2, 2, 4)
    case.assert_caches_written()


# ------------------------------------------------------------------- torch.library registration


def test_opcheck_tokenize_and_detokenize():
    x = torch.randn(2, 3, 16, 24)
    torch.library.opcheck(_library.wavelet_tokenize, (x, 2, [2, 3], "ycbcr", torch.float32, "reference"))
    tokens = _library.wavelet_tokenize(x, 2, [2, 3], "ycbcr", torch.float32, "reference")
    torch.library.opcheck(_library.wavelet_detokenize, (tokens, 2, [2, 3], "ycbcr", [16, 24], "reference"))


def test_opcheck_attention_ops():
    q, k, v = (torch.randn(2, 2, 7, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_library.block_causal_attention, (q, k, v, [3, 4], 0.35, "reference"))
    qn = torch.randn(2, 2, 3, 8)
    cache = torch.randn(3, 2, 10, 8)
    args = (qn, qn.clone(), qn.clone(), cache, cache.clone(), torch.tensor([1, 4]), torch.tensor([2, 0]), 0.35)
    torch.library.opcheck(_library.attention_with_kv_append, (*args, "reference"))


def test_attention_gradients_match_sdpa():
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    from waveclip_kernels.reference import block_causal_mask

    out = wk.block_causal_attention(q, k, v, [3, 4], impl="reference")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask([3, 4]))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_ops_compile():
    def f(x, q):
        tokens = wk.wavelet_tokenize(x, 1, 2, impl="reference")
        return tokens[0].sum() + wk.block_causal_attention(q, q, q, [2, 3], scale=0.5, impl="reference").sum()

    x, q = torch.randn(1, 3, 8, 8), torch.randn(1, 2, 5, 4)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x, q), f(x, q))


def test_reference_runs_without_triton_or_extension():
    """A fresh interpreter where `import triton` and the extension fail still runs every reference op."""
    code = textwrap.dedent(
        """
        import sys
        import torch  # torch probes for Triton itself; the block starts after it
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton.") or name == "waveclip_kernels._C":
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import waveclip_kernels as wk
        x = torch.randn(1, 3, 16, 16)
        t = wk.wavelet_tokenize(x, 2, 2)
        assert torch.allclose(wk.wavelet_detokenize(t, 2, 2, image_size=16), x, atol=1e-5)
        q = torch.randn(1, 2, 5, 4)
        wk.block_causal_attention(q, q, q, [2, 3])
        cache = torch.zeros(1, 2, 8, 4)
        wk.attention_with_kv_append(q, q, q, cache, cache.clone(), [0])
        impls = wk.available_impls("cpu")
        assert all(v == ["reference"] for v in impls.values()), impls
        assert "triton" not in sys.modules and "waveclip_kernels._C" not in sys.modules
        print("ok")
        """
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
