"""waveclip_kernels: wavelet tokenization and block-causal attention ops with several backends.

    import waveclip_kernels as wk
    tokens = wk.wavelet_tokenize(images, levels=3, grid=7)
    out = wk.block_causal_attention(q, k, v, block_sizes=[50, 50, 50, 50])

Importing this package loads neither Triton nor the C++ extension; both load on first use.
"""

from .api import (
    IMPLS,
    OPS,
    attention_with_kv_append,
    available_impls,
    block_causal_attention,
    resolve_impl,
    wavelet_detokenize,
    wavelet_tokenize,
)
from .kvappend import KVAppendPlan, kv_append_plan

__all__ = [
    "IMPLS",
    "OPS",
    "KVAppendPlan",
    "attention_with_kv_append",
    "available_impls",
    "block_causal_attention",
    "kv_append_plan",
    "resolve_impl",
    "wavelet_detokenize",
    "wavelet_tokenize",
]
__version__ = "0.1.0"
