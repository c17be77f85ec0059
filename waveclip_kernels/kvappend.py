"""The checked lengths and rows of one KV append step, and the memory checks every append runs first.

`attention_with_kv_append` needs each query row's cache length and cache row on the host: to check them
(negative lengths, overflow, rows outside the cache, duplicate rows) and, for the C++ kernels, to place
the copies. Reading them from a tensor is a host sync on a GPU, and a transformer calls the op once per
layer with the same lengths and rows. `kv_append_plan` reads and checks them once; every layer's call
then takes the plan and checks nothing again but its shapes (the C++ side keeps its O(B) bounds checks).

    plan = wk.kv_append_plan(cache_lens, batch_index, new_tokens=n, k_cache=k_caches[0])
    for layer in range(L):
        out = wk.attention_with_kv_append(q, k_new, v_new, k_caches[layer], v_caches[layer], plan)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVAppendPlan:
    """Checked cache lengths and rows of one append step, reusable by every layer's call.

    Build it with `kv_append_plan`; it holds for caches of the same (B_cache, N_max) on one device.
    """

    lens: tuple[int, ...]  # filled length of each query row's cache row before the append
    rows: tuple[int, ...]  # cache row of each query row, distinct
    new_tokens: int  # n: positions every row appends
    cache_rows: int  # B_cache the rows were checked against
    cache_len: int  # N_max the lengths were checked against
    cache_lens: Tensor  # (B,) int64 `lens` on the caches' device (the Triton kernel reads them there)
    batch_index: Tensor | None  # (B,) int64 `rows` on that device; None when rows are 0..B-1

    @property
    def batch(self) -> int:
        return len(self.lens)


def _host_ints(name: str, x, batch: int, device: torch.device) -> list[int]:
    """The values of an index argument (a (B,) int tensor or a sequence of B ints) on the host."""
    if isinstance(x, Tensor):
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must hold int32 or int64 values, got {x.dtype}")
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the caches are on {device}")
        return x.tolist()
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"{name} must be a ({batch},) int tensor or a sequence of {batch} ints, got {type(x).__name__}")
    try:
        values = [operator.index(v) for v in x]
    except TypeError:
        raise TypeError(f"{name} must hold ints, got {list(x)!r}") from None
    if len(values) != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {len(values)} values")
    return values


def check_plan_values(lens: list[int], rows: list[int] | None, n: int, cache_rows: int, cache_len: int) -> list[int]:
    """Raise a ValueError naming the first bad row; returns the cache rows (0..B-1 when `rows` is None)."""
    B = len(lens)
    if rows is None:
        if B > cache_rows:
            raise ValueError(f"q has batch {B} but the caches hold {cache_rows} rows; pass batch_index")
        rows = list(range(B))
    else:
        bad = [r for r in rows if not 0 <= r < cache_rows]
        if bad:
            raise ValueError(f"batch_index values must lie in [0, {cache_rows}), got {bad}")
        if len(set(rows)) != len(rows):
            dup = sorted({r for r in rows if rows.count(r) > 1})
            raise ValueError(f"batch_index has duplicate cache rows {dup}: two appends would race on one row")
    for b, c in enumerate(lens):
        if c < 0:
            raise ValueError(f"cache_lens must be >= 0: row {b} (cache row {rows[b]}) has cache_lens={c}")
        if c + n > cache_len:
            raise ValueError(
                f"cache overflow: row {b} (cache row {rows[b]}) has cache_lens={c}, appending {n} "
                f"needs {c + n} slots but N_max={cache_len}"
            )
    return rows


def kv_append_plan(cache_lens, batch_index, new_tokens: int, k_cache: Tensor) -> KVAppendPlan:
    """Read and check the lengths and rows of one append step once (one host read of each tensor).

    Args:
        cache_lens: (B,) int32/int64 tensor or a sequence of B ints: filled length of each row before
            the append.
        batch_index: None (query row b appends to cache row b) or (B,) distinct ints in [0, B_cache).
        new_tokens: n, the positions each row appends.
        k_cache: one (B_cache, H, N_max, D) cache the plan is for (only its shape and device are read).

    Returns:
        A `KVAppendPlan` that `attention_with_kv_append` takes in place of `cache_lens`.
    """
    if isinstance(cache_lens, Tensor):
        if cache_lens.dim() != 1:
            raise ValueError(f"cache_lens must have shape (B,), got {tuple(cache_lens.shape)}")
        batch = cache_lens.shape[0]
    elif isinstance(cache_lens, (str, bytes)) or not hasattr(cache_lens, "__len__"):
        raise TypeError(f"cache_lens must be a (B,) int tensor or a sequence of ints, got {type(cache_lens).__name__}")
    else:
        batch = len(cache_lens)
    return build_plan(cache_lens, batch_index, batch, new_tokens, k_cache)


def build_plan(cache_lens, batch_index, batch: int, new_tokens: int, k_cache: Tensor) -> KVAppendPlan:
    """`kv_append_plan` for a query batch of `batch` rows."""
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be a (B_cache, H, N_max, D) tensor, got {getattr(k_cache, 'shape', k_cache)}")
    n = operator.index(new_tokens)
    if n < 0:
        raise ValueError(f"new_tokens must be >= 0, got {n}")
    device = k_cache.device
    lens, rows = host_lens_rows(cache_lens, batch_index, batch, n, k_cache)
    return KVAppendPlan(
        lens=tuple(lens),
        rows=tuple(rows),
        new_tokens=n,
        cache_rows=k_cache.shape[0],
        cache_len=k_cache.shape[2],
        cache_lens=torch.tensor(lens, dtype=torch.int64, device=device),
        batch_index=None if batch_index is None else torch.tensor(rows, dtype=torch.int64, device=device),
    )


def host_lens_rows(cache_lens, batch_index, batch: int, n: int, k_cache: Tensor) -> tuple[list[int], list[int]]:
    """The checked lengths and cache rows of a batch of `batch` query rows appending n positions."""
    lens = _host_ints("cache_lens", cache_lens, batch, k_cache.device)
    rows = None if batch_index is None else _host_ints("batch_index", batch_index, batch, k_cache.device)
    return lens, check_plan_values(lens, rows, n, k_cache.shape[0], k_cache.shape[2])


# ----------------------------------------------------------------------------- memory overlap


def _span(t: Tensor) -> tuple[int, int] | None:
    """[first, last] byte addresses of t's elements; None when it has none."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size() - 1


def _meet(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _self_overlap(t: Tensor) -> bool:
    """True when two elements of t may share memory (stride 0, or strides that interleave)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    reach = 0  # largest offset reachable through the smaller-stride dims
    for stride, size in dims:
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_kv_memory(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """Refuse caches that overlap themselves or each other, and inputs that overlap a cache.

    The caches are written in place: a slot written twice, or an input that a write changes before it
    is read, would make the result depend on the backend's order of work. Checked on addresses (no sync).
    """
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if _self_overlap(cache):
            raise ValueError(
                f"{name} has elements that share memory (strides {tuple(cache.stride())} for shape "
                f"{tuple(cache.shape)}, e.g. an expanded view): the append would write one slot twice"
            )
    spans = {name: _span(t) for name, t in (("k_cache", k_cache), ("v_cache", v_cache))}
    if _meet(spans["k_cache"], spans["v_cache"]):
        raise ValueError("k_cache and v_cache share memory: the key and value appends would overwrite each other")
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        span = _span(t)
        for cache_name, cache_span in spans.items():
            if _meet(span, cache_span):
                raise ValueError(
                    f"{name} shares memory with {cache_name}: the append would change it while it is read; "
                    f"pass a copy ({name}.clone())"
                )
