"""open_clip interop: loading a teacher offline and rebuilding the one a student pairs with.

A teacher is named by an open_clip model name ("ViT-B-16"), an open_clip model config dict, or the
path of an open_clip model config `.json`; its weights by a checkpoint file or a pretrained tag already
in the local Hugging Face cache (nothing is downloaded), or None for random weights drawn under
`TEACHER_SEED`, so that a random teacher is the same in every run. `load_teacher` records on the model
which teacher it is; `WaveCLIP.from_open_clip` copies that record into the student's config, and
`load_paired_teacher` rebuilds exactly that teacher, checking its text tower's sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile

import torch
from torch import nn

from .config import WaveCLIPConfig
from .initialization import TEACHER_RECORD, stage_projection_init, text_tower_sha256, trunk_config
from .model import WaveCLIP

__all__ = [
    "TEACHER_SEED",
    "from_open_clip",
    "load_paired_teacher",
    "load_teacher",
    "local_model_dir",
    "stage_projection_init",
    "teacher_spec",
    "trunk_config",
]

TEACHER_SEED = 0  # random teacher weights are drawn under this seed


def _cached_hf_checkpoint(name: str, tag: str) -> str | None:
    """Local path of a pretrained tag's checkpoint in the Hugging Face cache, without any network call."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hub)
    for candidate in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        path = try_to_load_from_cache(repo, candidate)
        if isinstance(path, str):
            return path
    return None


def _builtin(name: str) -> bool:
    """True for a model config open_clip ships (not one registered at run time)."""
    import open_clip

    return (pathlib.Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").is_file()


def teacher_spec(teacher: str | dict | os.PathLike) -> tuple[str, dict | None]:
    """(name, model config or None): None for open_clip's built-in models, which are rebuilt by name.

    Args:
        teacher: an open_clip model name, an open_clip model config dict (named "custom"), or the path of
            an open_clip model config `.json` (named by its file stem).
    """
    import open_clip

    if isinstance(teacher, dict):
        return "custom", dict(teacher)
    text = str(teacher)
    if text.endswith(".json"):
        path = pathlib.Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"teacher config {path} does not exist")
        try:
            return path.stem, json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not an open_clip model config: {err}") from err
    if text not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {text!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    return text, (None if _builtin(text) else open_clip.get_model_config(text))


@contextlib.contextmanager
def local_model_dir(model_config: dict):
    """A temporary folder that open_clip's "local-dir:" schema reads the model config from."""
    with tempfile.TemporaryDirectory() as folder:
        pathlib.Path(folder, "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config}))
        yield folder


def _create(name: str, model_config: dict | None, path: str | None, quick_gelu: bool) -> nn.Module:
    """open_clip's create_model, by name or from a model config dict (through open_clip's local-dir schema)."""
    import open_clip

    if model_config is None:
        return open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu)
    with local_model_dir(model_config) as folder:
        model = open_clip.create_model(f"local-dir:{folder}", force_quick_gelu=quick_gelu)
    if path is not None:
        open_clip.load_checkpoint(model, path)
    return model


def _weights_path(name: str, weights, tags: list[str]) -> tuple[str | None, bool | None]:
    """(checkpoint file or None, the tag's quick_gelu or None) for a weights argument."""
    import open_clip

    if weights is None:
        return None, None
    if pathlib.Path(weights).is_file():
        return str(weights), None
    if str(weights) in tags:
        path = _cached_hf_checkpoint(name, str(weights))
        if path is None:
            raise RuntimeError(
                f"the pretrained weights {name}/{weights} are not on this machine and nothing is downloaded at "
                f"run time: fetch them where there is network (open_clip.create_model({name!r}, "
                f"pretrained={str(weights)!r})) and pass the checkpoint file's path instead"
            )
        return path, open_clip.get_pretrained_cfg(name, str(weights)).get("quick_gelu", False)
    raise FileNotFoundError(
        f"teacher weights {str(weights)!r} are neither a checkpoint file nor a pretrained tag of {name} "
        f"({', '.join(tags) or 'it has none'})"
    )


def load_teacher(
    name: str | dict | os.PathLike = "ViT-B-16",
    weights: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
) -> nn.Module:
    """An open_clip CLIP model, without touching the network, that records which teacher it is.

    Args:
        name: open_clip model name ("ViT-B-16"), an open_clip model config dict, or a config `.json` path.
        weights: None for random weights (drawn under TEACHER_SEED: the same in every run); a local
            checkpoint file; or a pretrained tag (e.g. "openai") whose checkpoint is already in the local
            Hugging Face cache.
        quick_gelu: force QuickGELU in the MLPs (default: what the tag says; True without a tag, as for
            OpenAI weights).

    Returns:
        The open_clip model in eval mode; its `waveclip_teacher` attribute holds the WaveCLIPConfig
        teacher fields (`teacher`, `teacher_config`, `teacher_weights`).
    """
    import open_clip

    model_name, model_config = teacher_spec(name)
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_config is None else []
    path, tag_quick_gelu = _weights_path(model_name, weights, tags)
    quick_gelu = next(q for q in (quick_gelu, tag_quick_gelu, True) if q is not None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_SEED)
        model = _create(model_name, model_config, path, quick_gelu)
    record = {"teacher": model_name, "teacher_config": model_config}
    record["teacher_weights"] = None if weights is None else str(weights)
    setattr(model, TEACHER_RECORD, record)
    return model.eval()


def load_paired_teacher(config: WaveCLIPConfig, weights: str | os.PathLike | None = None) -> nn.Module:
    """The teacher a student's config records, with the very text tower the student was paired with.

    Args:
        config: a student's config (e.g. from a checkpoint's config.json).
        weights: where the teacher's weights are on this machine (default: where the config says).

    Raises:
        ValueError: the config names no teacher, or the rebuilt text tower is not the recorded one.
    """
    if not config.teacher:
        raise ValueError("this config names no teacher (teacher is empty): there is no text tower to pair with")
    spec = config.teacher_config if config.teacher_config is not None else config.teacher
    weights = config.teacher_weights if weights is None else weights
    teacher = load_teacher(spec, weights, quick_gelu=config.quick_gelu)
    if config.teacher_config is not None:  # a config dict is named "custom" by load_teacher
        getattr(teacher, TEACHER_RECORD)["teacher"] = config.teacher
    digest = text_tower_sha256(teacher)
    if config.teacher_text_sha256 is not None and digest != config.teacher_text_sha256:
        raise ValueError(
            f"the text tower of teacher {config.teacher} with weights {weights!r} is not the one this student "
            f"was paired with (sha256 {digest[:12]}... vs {config.teacher_text_sha256[:12]}... recorded): pass "
            f"the teacher weights it was distilled against"
        )
    return teacher


def from_open_clip(teacher: nn.Module, config: WaveCLIPConfig | None = None, impl: str = "auto") -> WaveCLIP:
    """`WaveCLIP.from_open_clip`: a student initialised from an open_clip teacher."""
    return WaveCLIP.from_open_clip(teacher, config, impl)
