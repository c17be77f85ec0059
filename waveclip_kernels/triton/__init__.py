"""Triton backend (impl="triton"): the fused wavelet tokenizer and flash-style block-causal attention.

On a CUDA device the kernels compile for the GPU; on CPU tensors they run under TRITON_INTERPRET=1.
The functions take inputs already validated by `waveclip_kernels.api`.
"""

from .attention import (
    attention_configs,
    attention_with_kv_append,
    block_causal_attention,
    block_causal_attention_backward,
    block_causal_attention_forward,
    num_kv_splits,
)
from .wavelet import wavelet_detokenize, wavelet_tokenize

OPS = ("wavelet_tokenize", "wavelet_detokenize", "block_causal_attention", "attention_with_kv_append")

__all__ = [
    "OPS",
    "attention_configs",
    "attention_with_kv_append",
    "block_causal_attention",
    "block_causal_attention_backward",
    "block_causal_attention_forward",
    "num_kv_splits",
    "wavelet_detokenize",
    "wavelet_tokenize",
]
