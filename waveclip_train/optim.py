"""AdamW with two learning rates, and its schedule: linear warm-up, then cosine decay.

The embeddings the teacher does not have (stage projections, level and position embeddings, class
tokens) learn at `lr_new`; the trunk copied from the teacher at `lr`. Biases, norms and embeddings
get no weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters the teacher does not have (or has in another form): they get lr_new.
NEW_EMBEDDINGS = ("stage_proj.", "class_embedding", "positional_embedding", "level_embedding")
NO_DECAY = ("class_embedding", "positional_embedding", "level_embedding")
BETAS = (0.9, 0.98)  # CLIP's
EPS = 1e-6


def param_groups(model: nn.Module, lr: float, lr_new: float, weight_decay: float) -> list[dict]:
    """AdamW groups: new embeddings vs trunk, each with and without weight decay (biases, norms, embeddings).

    Each group is named "new", "new_no_decay", "trunk" or "trunk_no_decay".
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = name.startswith(NEW_EMBEDDINGS)
        decay = p.dim() >= 2 and not name.startswith(NO_DECAY)
        groups.setdefault((new, decay), []).append(p)
    if not any(new for new, _ in groups):
        raise ValueError(f"the student has none of the new embeddings {NEW_EMBEDDINGS}")
    return [
        {
            "params": params,
            "lr": lr_new if new else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": ("new" if new else "trunk") + ("" if decay else "_no_decay"),
        }
        for (new, decay), params in sorted(groups.items(), reverse=True)
    ]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (from 0) over the peak: linear warm-up over `warmup`
    steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, lr: float, lr_new: float, weight_decay: float, total_steps: int, warmup: int, min_ratio: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` and the `lr_factor` schedule, stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(param_groups(model, lr, lr_new, weight_decay), betas=BETAS, eps=EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, min_ratio)
    )
    return optimizer, scheduler


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each named group, as the next `optimizer.step()` will use it."""
    return {g["name"]: g["lr"] for g in optimizer.param_groups}
