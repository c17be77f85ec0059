"""Zero-shot classification with early exit: the margin gate (docs/design.md section 2).

Logits at stage s are `logit_scale * z_s @ T.T` over unit class text embeddings T. A sample exits at the
first stage whose margin (top-1 minus top-2 softmax probability) is >= thresholds[s]; the last stage
always answers. Samples that exit leave the batch; the others refine with the cached keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_thresholds
from .flops import exit_gflops
from .model import WaveCLIP

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


@torch.no_grad()
def class_text_embeddings(
    teacher: nn.Module, tokenizer, class_names: Sequence[str], templates=DEFAULT_TEMPLATES
) -> Tensor:
    """(C, embed_dim) unit class embeddings: each class's prompts through the teacher's text tower, averaged.

    Args:
        teacher: open_clip CLIP model (its `encode_text` is used).
        tokenizer: the teacher's open_clip tokenizer.
        class_names: C names, e.g. ["cat", "dog"].
        templates: prompt templates with one "{}" each; the class's prompt embeddings are averaged.
    """
    _check_classes(class_names)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f'templates must be a non-empty list of strings with a "{{}}" each, got {templates!r}')
    prompts = [t.format(name) for name in class_names for t in templates]
    text = F.normalize(teacher.encode_text(tokenizer(prompts)), dim=-1)
    return F.normalize(text.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


def _check_classes(class_names) -> None:
    if class_names is None or len(class_names) == 0:
        raise ValueError("zero-shot classification needs at least one class name; the class list is empty")


@dataclass
class Prediction:
    label: int  # index of the answer in the class list
    name: str | None  # its class name, when names are known
    probs: Tensor  # (C,) softmax probabilities at the exit stage
    exit_stage: int  # the stage that answered
    gflops: float  # GFLOPs spent on this sample: every stage up to its exit (`flops.exit_gflops` at its size)


class ZeroShotClassifier:
    """Adaptive zero-shot classification: answer at the first stage whose margin clears its threshold.

    Args:
        model: the WaveCLIP tower.
        class_embeddings: (C, embed_dim) class text embeddings (normalised here).
        class_names: optional C names for the answers.
        logit_scale: multiplies the cosine similarities (CLIP's learned temperature, 100 for OpenAI weights).
        thresholds: margin threshold per non-final stage (default: the model config's).
    """

    def __init__(
        self,
        model: WaveCLIP,
        class_embeddings: Tensor,
        class_names: Sequence[str] | None = None,
        logit_scale: float = 100.0,
        thresholds: Sequence[float] | None = None,
    ):
        if not isinstance(class_embeddings, Tensor) or class_embeddings.dim() != 2:
            shape = getattr(class_embeddings, "shape", None)
            raise ValueError(f"class_embeddings must be a (C, embed_dim) tensor, got {shape}")
        if class_embeddings.shape[0] == 0:
            raise ValueError("zero-shot classification needs at least one class; the class list is empty")
        if class_embeddings.shape[1] != model.config.embed_dim:
            raise ValueError(
                f"class_embeddings have {class_embeddings.shape[1]} features; the model embeds in "
                f"{model.config.embed_dim}"
            )
        if class_names is not None and len(class_names) != class_embeddings.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {class_embeddings.shape[0]} class embeddings")
        thresholds = model.config.thresholds if thresholds is None else thresholds
        thresholds = check_thresholds(thresholds, model.config.levels)
        self.model = model
        self.class_embeddings = F.normalize(class_embeddings.detach().to(model.proj), dim=-1)
        self.class_names = list(class_names) if class_names is not None else None
        self.logit_scale = float(logit_scale)
        self.thresholds = thresholds
        self.exit_gflops = exit_gflops(model.config)  # cumulative GFLOPs per image at each exit, full size

    @classmethod
    def from_teacher(
        cls,
        model: WaveCLIP,
        teacher: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        thresholds: Sequence[float] | None = None,
    ) -> ZeroShotClassifier:
        """Class embeddings and logit scale from an open_clip teacher's text tower."""
        _check_classes(class_names)
        embeddings = class_text_embeddings(teacher, tokenizer, class_names, templates)
        scale = teacher.logit_scale.exp().item() if hasattr(teacher, "logit_scale") else 100.0
        return cls(model, embeddings, class_names, logit_scale=scale, thresholds=thresholds)

    def probabilities(self, z: Tensor) -> Tensor:
        """(n, embed_dim) exit embeddings -> (n, C) softmax probabilities."""
        return torch.softmax(self.logit_scale * z @ self.class_embeddings.T, dim=-1)

    @staticmethod
    def margin(probs: Tensor) -> Tensor:
        """(n, C) -> (n,) top-1 minus top-2 probability (top-1 alone with a single class)."""
        if probs.shape[-1] == 1:
            return probs[..., 0]
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    @torch.inference_mode()
    def predict(self, images: Tensor, impl: str | None = None) -> list[Prediction]:
        """Classify a batch, each sample leaving at the first stage confident enough.

        Args:
            images: (B, 3, H, W) CLIP-preprocessed images of any size the model takes
                (`WaveCLIP.num_stages_for`); a smaller image has fewer stages, and its last one answers.
            impl: kernel impl override.

        Returns:
            B predictions in batch order.
        """
        B = images.shape[0]
        state = self.model.start(images, impl)
        last = state.num_stages - 1
        gflops = exit_gflops(self.model.config, tuple(images.shape[-2:]))
        answers: list[Prediction | None] = [None] * B
        while True:
            probs = self.probabilities(state.latest())
            s = state.stage
            if s == last:
                exits = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
            else:
                exits = self.margin(probs) >= self.thresholds[s]
            for row, p, leaves in zip(state.active.tolist(), probs, exits.tolist()):
                if leaves:
                    label = int(p.argmax())
                    name = self.class_names[label] if self.class_names is not None else None
                    answers[row] = Prediction(label, name, p.clone(), s, gflops[s])
            if bool(exits.all()):
                return answers
            self.model.refine(state, active=state.active[~exits])
