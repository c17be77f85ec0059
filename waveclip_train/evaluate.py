"""How close the student's exits are to the teacher: measured before and after a distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def exit_cosines(model, dataset, teacher_emb: Tensor, batch_size: int, device, autocast) -> dict[str, list[float]]:
    """Per exit, the mean student-teacher cosine, raw and centred (both minus the teacher's mean embedding,
    which shows how much of the image-to-image variation the student reproduces)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    student = []
    was_training = model.training
    model.eval()
    for images, _ in loader:
        with autocast():
            student.append(model(images.to(device)).float().cpu())
    model.train(was_training)
    z, t = torch.cat(student), teacher_emb
    mean = t.mean(0)
    raw = (z * t[:, None]).sum(-1).mean(0)
    centred = F.cosine_similarity(z - mean, (t - mean)[:, None], dim=-1).mean(0)
    return {"cosine": raw.tolist(), "centred_cosine": centred.tolist()}


def format_cosines(values) -> str:
    return ", ".join(f"exit {s} {v:.4f}" for s, v in enumerate(values))
