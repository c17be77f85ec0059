"""Loader and thin wrappers for the compiled extension `waveclip_kernels._C` (impl "cpu"/"cuda").

Nothing is imported until an op asks: the package works when the extension was never built.
"""

from __future__ import annotations

import functools
import importlib

# Ops each build of the extension provides.
CPU_OPS = ("wavelet_tokenize", "wavelet_detokenize", "attention_with_kv_append")
CUDA_OPS = ("wavelet_tokenize", "wavelet_detokenize", "attention_with_kv_append")


@functools.cache
def load():
    """The extension module, or the ImportError that says why it is missing."""
    import torch  # noqa: F401  (libc10 must be loaded before the extension)

    try:
        return importlib.import_module("waveclip_kernels._C")
    except ImportError as err:
        return err


def unavailable_reason(op: str, impl: str) -> str | None:
    """None when the extension runs `op` for `impl` ("cpu" or "cuda"), else why not."""
    ext = load()
    if isinstance(ext, ImportError):
        return f"the C++ extension is not built ({ext}); run `make setup` or `pip install -e . --no-build-isolation`"
    ops = CPU_OPS if impl == "cpu" else CUDA_OPS
    if op not in ops:
        return f"the extension has no {impl} {op}"
    if impl == "cuda" and not ext.has_cuda():
        return "the extension was built without CUDA"
    return None
