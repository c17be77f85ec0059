"""The distillation loss: every exit toward the teacher's embedding, optionally matching its zero-shot logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distill_loss(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor,
    class_embeddings: Tensor | None = None,
    logit_scale: float = 100.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`sum_s w_s (1 - cos(student_s, teacher))`, plus `kl_weight T^2 sum_s w_s KL(teacher || student_s)`
    on the zero-shot logits over the class embeddings at temperature T when those are given.

    Args:
        student: (B, S, D) unit exit embeddings.
        teacher: (B, D) unit teacher embeddings.
        weights: (S,) per-exit weights w_s.
        class_embeddings: (K, D) unit class text embeddings; enables the KL term.
        logit_scale: multiplies cosine similarities into logits (the teacher's).
        kl_weight, temperature: the KL term's weight and softmax temperature.

    Returns:
        The scalar loss (batch mean), the (S,) mean of 1 - cos per exit, and the (S,) mean KL per exit (or None).
    """
    student, teacher = student.float(), teacher.float()
    cos_loss = (1 - (student * teacher[:, None]).sum(-1)).mean(0)
    loss = (weights * cos_loss).sum()
    kl = None
    if class_embeddings is not None:
        t_logits = logit_scale * teacher @ class_embeddings.T / temperature
        s_logits = logit_scale * student @ class_embeddings.T / temperature
        t_logp = F.log_softmax(t_logits, dim=-1)[:, None]
        kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits, dim=-1))).sum(-1).mean(0)
        loss = loss + kl_weight * temperature**2 * (weights * kl).sum()
    return loss, cos_loss.detach(), None if kl is None else kl.detach()


def exit_weights(weights, num_exits: int, device: torch.device | str = "cpu") -> Tensor:
    """(S,) float32 per-exit weights: the given ones, or 1 for every exit."""
    if weights is None:
        return torch.ones(num_exits, device=device)
    w = torch.tensor(list(weights), dtype=torch.float32, device=device)
    if w.shape != (num_exits,):
        raise ValueError(f"exit_weights needs {num_exits} values (one per exit), got {list(weights)}")
    return w
