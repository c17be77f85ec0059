"""State of an incremental (coarse-to-fine) WaveCLIP inference: the per-layer KV cache and who is still running.

`WaveCLIP.start` creates an `InferenceState`; every `WaveCLIP.refine` appends one stage block's keys and
values to the cache in place. The stage tokens may all be known from the start (tokenized images) or
arrive one stage at a time with `refine(state, tokens=...)`. Samples that exit drop out of `active`;
their cache rows stay where they are (the attention op maps active query rows to cache rows through
`batch_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InferenceState:
    tokens: list[Tensor]  # the stage tokens known so far, coarse to fine: (B, Gh*Gw, dim_s) each
    num_stages: int  # stages this input can reach (tokens may arrive stage by stage up to this many)
    keys: Tensor  # (layers, B, heads, N_total, head_dim): every layer's K cache, filled stage by stage
    values: Tensor  # (layers, B, heads, N_total, head_dim): every layer's V cache
    cache_lens: Tensor  # (B,) int64: filled length of each cache row
    active: Tensor  # (n,) int64, increasing: batch rows (= cache rows) that ran the latest stage
    stage: int  # the latest stage run (by the rows in `active`); -1 before the first
    last_stage: Tensor  # (B,) int64: the last stage each sample ran; -1 before the first
    embeddings: Tensor  # (B, num_stages, embed_dim) exit embeddings; NaN where a sample did not run that stage
    impl: str  # kernel impl the ops are called with

    @classmethod
    def allocate(
        cls,
        tokens: list[Tensor],
        num_stages: int,
        layers: int,
        heads: int,
        seq_len: int,
        head_dim: int,
        embed_dim: int,
        impl: str,
    ) -> InferenceState:
        """Empty caches for every stage of a batch; nothing has run yet."""
        B, dtype, device = tokens[0].shape[0], tokens[0].dtype, tokens[0].device
        shape = (layers, B, heads, seq_len, head_dim)
        # Under autocast the QKV projection yields the autocast dtype: the caches hold what it yields.
        kv_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
        return cls(
            tokens=tokens,
            num_stages=num_stages,
            keys=torch.empty(shape, dtype=kv_dtype, device=device),
            values=torch.empty(shape, dtype=kv_dtype, device=device),
            cache_lens=torch.zeros(B, dtype=torch.int64, device=device),
            active=torch.arange(B, device=device),
            stage=-1,
            last_stage=torch.full((B,), -1, dtype=torch.int64, device=device),
            embeddings=torch.full((B, num_stages, embed_dim), float("nan"), dtype=dtype, device=device),
            impl=impl,
        )

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]

    @property
    def done(self) -> bool:
        """True when no sample can be refined further (last stage reached, or nobody is active)."""
        return self.stage == self.num_stages - 1 or self.active.numel() == 0

    def latest(self) -> Tensor:
        """(n, embed_dim): the exit embeddings of the active rows at the latest stage."""
        return self.embeddings[self.active, self.stage]

    def select(self, active: Tensor | Sequence[int] | Sequence[bool] | None) -> Tensor:
        """Batch rows that run the next stage: a subset of the current active rows.

        Args:
            active: None (every active row), a (B,) boolean mask over the whole batch, or batch indices.

        Returns:
            (n,) int64 increasing batch indices.
        """
        if active is None:
            return self.active
        device = self.cache_lens.device
        rows = torch.as_tensor(active, device=device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.batch_size,):
                raise ValueError(f"a boolean active mask must have shape ({self.batch_size},), got {tuple(rows.shape)}")
            rows = rows.nonzero().flatten()
        elif rows.numel() == 0:
            rows = rows.to(torch.int64)
        elif rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
            raise TypeError(f"active must be a boolean mask or a 1-D sequence of batch indices, got {active!r}")
        rows = rows.to(torch.int64)
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"active has duplicate batch indices: {rows.tolist()}")
        rows = rows.sort().values
        if not torch.isin(rows, self.active).all():
            raise ValueError(
                f"active must be a subset of the rows that ran stage {self.stage} "
                f"({self.active.tolist()}); got {rows.tolist()}"
            )
        return rows
