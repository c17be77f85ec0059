"""Eager PyTorch oracle: runs on any device, with no Triton and no extension."""

from .attention import attention_with_kv_append, block_causal_attention, block_causal_mask, block_levels
from .wavelet import wavelet_detokenize, wavelet_tokenize

__all__ = [
    "attention_with_kv_append",
    "block_causal_attention",
    "block_causal_mask",
    "block_levels",
    "wavelet_detokenize",
    "wavelet_tokenize",
]
