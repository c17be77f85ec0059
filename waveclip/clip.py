"""The open_clip-style API: a CLIP-like model pairing the WaveCLIP tower with its teacher's text tower.

    model, _, preprocess = waveclip.create_model_and_transforms("waveclip-vit-b-16")
    tokenizer = waveclip.get_tokenizer("waveclip-vit-b-16")
    image_features = model.encode_image(preprocess(image)[None])   # (1, 512), the last exit
    text_features = model.encode_text(tokenizer(["a cat", "a dog"]))

Named and called as open_clip's `create_model_and_transforms`, `get_tokenizer` and `CLIP`, so code
written for open_clip models (CLIP_benchmark's zero-shot evaluation, for one) runs on it unchanged.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor, nn

from . import checkpoint
from .config import PRESET_TEACHERS, PRESETS, WaveCLIPConfig
from .initialization import trunk_config
from .interop import load_paired_teacher, load_teacher, local_model_dir, teacher_spec
from .model import WaveCLIP

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
GEOMETRY = ("image_size", "levels", "grid", "color")  # what a checkpoint must share with its preset


class WaveCLIPModel(nn.Module):
    """The WaveCLIP tower (`visual`) and the teacher's text tower, called like open_clip's CLIP.

    Args:
        visual: the WaveCLIP tower.
        teacher: the open_clip CLIP whose text tower `encode_text` runs (its image tower is dropped);
            `logit_scale` (and `logit_bias`, where it has one) are its parameters.
    """

    output_dict: bool = False  # as open_clip's: forward returns a dict when True

    def __init__(self, visual: WaveCLIP, teacher: nn.Module):
        super().__init__()
        if not hasattr(teacher, "encode_text") or not hasattr(teacher, "logit_scale"):
            raise TypeError(f"the teacher must be an open_clip CLIP with a text tower, got {type(teacher).__name__}")
        teacher.visual = None  # the student replaces it; encode_text does not use it
        self.visual, self.text = visual, teacher
        self.logit_scale = teacher.logit_scale
        self.logit_bias = getattr(teacher, "logit_bias", None)

    def encode_image(self, image: Tensor, normalize: bool = False, exit: int | None = None) -> Tensor:
        """(B, 3, H, W) images -> (B, embed_dim) features at the last exit the size reaches, or at `exit`.

        Exits are unit vectors already, so `normalize` changes nothing; it is there as in open_clip.
        Asking for an earlier exit runs only the stages up to it.
        """
        tokens = self.visual.tokenize(image)
        if exit is None:
            exit = len(tokens) - 1
        if not 0 <= exit < len(tokens):
            raise ValueError(f"exit {exit} is not one this image size reaches (0..{len(tokens) - 1})")
        return self.visual.forward_tokens(tokens[: exit + 1])[:, exit]

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """(B, context_length) token ids -> (B, embed_dim) features from the teacher's text tower."""
        return self.text.encode_text(text, normalize=normalize)

    def forward(self, image: Tensor | None = None, text: Tensor | None = None):
        """What open_clip's CLIP returns: (image_features, text_features, logit_scale.exp()[, logit_bias])."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features}
            out["logit_scale"] = self.logit_scale.exp()
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tower's checkpoint; its config.json records the text tower it pairs with."""
        self.visual.save_pretrained(directory)


def _preset(model_name: str) -> WaveCLIPConfig:
    if model_name not in PRESETS:
        raise ValueError(f"unknown model {model_name!r}; WaveCLIP models: {', '.join(sorted(PRESETS))}")
    return PRESETS[model_name]


def _transforms(config: WaveCLIPConfig, teacher: nn.Module):
    """open_clip's train and eval transforms at the tower's size, with the teacher's normalisation."""
    import open_clip

    cfg = {k: v for k, v in teacher.visual.preprocess_cfg.items() if k not in ("size", "mode")}
    train = open_clip.image_transform(config.image_size, is_train=True, mean=cfg["mean"], std=cfg["std"])
    val = open_clip.image_transform(config.image_size, is_train=False, **cfg)
    return train, val


def create_model_and_transforms(
    model_name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    teacher: str | dict | os.PathLike | None = None,
    teacher_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    impl: str = "auto",
):
    """A CLIP-like WaveCLIP model and its preprocessing, as open_clip's function of the same name gives them.

    Args:
        model_name: a preset: "waveclip-vit-b-16", "waveclip-vit-b-16-448" or "waveclip-tiny".
        pretrained: a directory `save_pretrained` wrote (its geometry must be the preset's), or None for
            a student initialised from the teacher (not distilled).
        teacher: the teacher whose text tower encodes text: an open_clip model name, an open_clip model
            config dict or a config `.json` path. Default: the one the checkpoint records, else the
            preset's (`config.PRESET_TEACHERS`; the tiny preset's is `config.TINY_TEACHER`).
        teacher_weights: a checkpoint file or a cached pretrained tag. Default: the checkpoint's record,
            else random weights (seeded, the same in every run).
        device, precision: where and in which dtype ("fp32", "fp64", "fp16", "bf16") both towers run.
        impl: kernel impl of the tower.

    Returns:
        (model, preprocess_train, preprocess_val): a `WaveCLIPModel` in eval mode and open_clip
        transforms at the tower's image size.

    Raises:
        ValueError: unknown name or precision, a checkpoint of another geometry, or a text tower that
            is not the one the checkpoint was paired with.
    """
    preset = _preset(model_name)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if pretrained is not None:
        student = WaveCLIP.from_pretrained(pretrained, impl=impl)
        config = student.config
        differs = [f"{k} {getattr(config, k)} vs {getattr(preset, k)}" for k in GEOMETRY]
        differs = [d for d, k in zip(differs, GEOMETRY) if getattr(config, k) != getattr(preset, k)]
        if differs:
            raise ValueError(f"{pretrained} is not a {model_name} checkpoint ({', '.join(differs)})")
        if teacher is not None:
            name, model_config = teacher_spec(teacher)
            config = dataclasses.replace(config, teacher=name, teacher_config=model_config)
        if not config.teacher:
            raise ValueError(f"{pretrained} records no teacher: pass teacher= to give it a text tower")
        text_teacher = load_paired_teacher(config, teacher_weights)
    else:
        spec = PRESET_TEACHERS[model_name] if teacher is None else teacher
        text_teacher = load_teacher(spec, teacher_weights, quick_gelu=preset.quick_gelu)
        config = dataclasses.replace(preset, **trunk_config(text_teacher))
        student = WaveCLIP.from_open_clip(text_teacher, config, impl=impl)
    preprocess_train, preprocess_val = _transforms(student.config, text_teacher)
    model = WaveCLIPModel(student, text_teacher)
    return model.to(device=device, dtype=PRECISIONS[precision]).eval(), preprocess_train, preprocess_val


def get_tokenizer(model_name: str, teacher: str | dict | os.PathLike | None = None):
    """The text tokenizer of a model's teacher, as open_clip's `get_tokenizer` gives it.

    Args:
        model_name: a preset name, or a directory `save_pretrained` wrote (its recorded teacher).
        teacher: the teacher, as `create_model_and_transforms` takes it (default: the model's).
    """
    import open_clip

    if teacher is None:
        if os.path.isdir(model_name):
            config = checkpoint.read_config(model_name)
            if not config.teacher:
                raise ValueError(f"{model_name} records no teacher: pass teacher=")
            teacher = config.teacher_config if config.teacher_config is not None else config.teacher
        else:
            _preset(model_name)
            teacher = PRESET_TEACHERS[model_name]
    name, model_config = teacher_spec(teacher)
    if model_config is None:
        return open_clip.get_tokenizer(name)
    with local_model_dir(model_config) as folder:
        return open_clip.get_tokenizer(f"local-dir:{folder}")
