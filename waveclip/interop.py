"""open_clip interop: loading a teacher offline, initialising a student from it, own checkpoints.

The student takes the teacher's trunk, `ln_pre`, `ln_post` and `proj` as they are. Its stage
projections are set analytically (`stage_projection_init`) so that, for every grid cell, the sum over
stages of `W_s @ token_s` is the mean of the teacher's patch embeddings over that cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import waveclip_kernels as wk
from waveclip_kernels.common import color_matrix

from .config import PRESETS, WaveCLIPConfig
from .model import WaveCLIP

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# ---------------------------------------------------------------------------------------- teacher


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


def load_teacher(
    name: str = "ViT-B-16", weights: str | os.PathLike | None = None, quick_gelu: bool | None = None
) -> nn.Module:
    """An open_clip CLIP model, without touching the network.

    Args:
        name: open_clip model name, e.g. "ViT-B-16".
        weights: None for random weights; a local checkpoint file; or a pretrained tag (e.g. "openai")
            whose checkpoint is already in the local Hugging Face cache.
        quick_gelu: force QuickGELU in the MLPs (default: what the tag says; True without a tag, as for
            OpenAI weights).

    Returns:
        The open_clip model in eval mode.
    """
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if weights is None:
        path = None
    elif pathlib.Path(weights).is_file():
        path = str(weights)
    elif str(weights) in tags:
        path = _cached_hf_checkpoint(name, str(weights))
        if path is None:
            raise RuntimeError(
                f"the pretrained weights {name}/{weights} are not on this machine and nothing is downloaded at "
                f"run time: fetch them where there is network (open_clip.create_model({name!r}, "
                f"pretrained={str(weights)!r})) and pass the checkpoint file's path instead"
            )
        if quick_gelu is None:
            quick_gelu = open_clip.get_pretrained_cfg(name, str(weights)).get("quick_gelu", False)
    else:
        raise FileNotFoundError(
            f"teacher weights {str(weights)!r} are neither a checkpoint file nor a pretrained tag of {name} "
            f"({', '.join(tags)})"
        )
    quick_gelu = True if quick_gelu is None else quick_gelu
    model = open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu)
    return model.eval()


def _visual(teacher: nn.Module) -> nn.Module:
    visual = getattr(teacher, "visual", teacher)
    missing = [
        a for a in ("conv1", "class_embedding", "positional_embedding", "transformer", "proj") if not hasattr(visual, a)
    ]
    if missing:
        raise TypeError(
            f"expected an open_clip CLIP or VisionTransformer, got {type(teacher).__name__} without {missing}"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError(
            "only teachers that pool the class token (pool_type='tok', no attentional pooler) are supported"
        )
    if isinstance(visual.ln_pre, nn.Identity) or visual.proj is None:
        raise ValueError("the teacher needs ln_pre and a projection (no_ln_pre / proj=None are not supported)")
    block = visual.transformer.resblocks[0]
    if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or not isinstance(block.ls_1, nn.Identity):
        raise ValueError("only open_clip ResidualAttentionBlock trunks without layer scale are supported")
    return visual


def trunk_config(teacher: nn.Module) -> dict:
    """The teacher's trunk sizes as WaveCLIPConfig fields."""
    visual = _visual(teacher)
    block = visual.transformer.resblocks[0]
    width = visual.transformer.width
    return dict(
        width=width,
        layers=len(visual.transformer.resblocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        embed_dim=visual.proj.shape[1],
        quick_gelu=type(block.mlp.gelu).__name__ == "QuickGELU",
        teacher_patch_size=visual.conv1.kernel_size[0],
    )


# ------------------------------------------------------------------------------------ student init


def stage_projection_init(conv_weight: Tensor, config: WaveCLIPConfig) -> list[Tensor]:
    """Stage projections W_s (width, dim_s) that reproduce the teacher's mean patch embedding per grid cell.

    One grid cell is (H/Gh) x (W/Gw) pixels, aligned to 2**L, so the cell's tokens over all stages are a
    linear function of its pixels alone: t = Q C x, where C mixes each pixel's channels (the colour
    matrix) and Q is the orthonormal Haar transform laid out as tokens (tokenization with color="rgb",
    Q^-1 = Q^T). The mean of the teacher's patch embeddings over the cell is M x, where row w of M, seen
    as a one-cell image, is filter w of the teacher's patch embedding tiled over the cell's patches and
    divided by their number. Then W = M (Q C)^-1 = M C^-1 Q^T, i.e. W^T = Q C^-T M^T: tokenizing the
    rows of M (mixed by C^-T) gives the rows of every W_s, and sum_s W_s t_s = M x for every cell.

    Args:
        conv_weight: (width, 3, P, P) teacher patch embedding (a stride-P convolution without bias).
        config: the student's config; the cell must be a whole number of P x P patches.

    Returns:
        L+1 float64 tensors (width, dim_s), coarse to fine.
    """
    (H, W), (gh, gw) = config.image_size, config.grid
    cell = (H // gh, W // gw)
    patch = tuple(conv_weight.shape[-2:])
    if cell[0] % patch[0] or cell[1] % patch[1]:
        raise ValueError(f"a grid cell of {cell} pixels is not a whole number of the teacher's {patch} patches")
    reps = (cell[0] // patch[0], cell[1] // patch[1])
    weight = conv_weight.detach().to(device="cpu", dtype=torch.float64)
    mean_operator = weight.repeat(1, 1, *reps) / (reps[0] * reps[1])  # (width, 3, cell_h, cell_w): rows of M
    color_inverse = color_matrix(config.color, torch.float64, "cpu", inverse=True)
    rows = torch.einsum("co,wchx->wohx", color_inverse, mean_operator)  # C^-T applied to every row of M
    tokens = wk.wavelet_tokenize(rows, config.levels, (1, 1), "rgb", impl="reference")  # (width, 1, dim_s) each
    return [t[:, 0].contiguous() for t in tokens]


def resize_positional_embedding(pos: Tensor, teacher_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """(gh_t * gw_t, width) patch position embeddings -> (Gh * Gw, width), resized bilinearly."""
    width = pos.shape[-1]
    image = pos.detach().to(torch.float64).reshape(1, *teacher_grid, width).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)


def from_open_clip(teacher: nn.Module, config: WaveCLIPConfig | None = None, impl: str = "auto") -> WaveCLIP:
    """A WaveCLIP student initialised from an open_clip CLIP (or its `.visual`).

    Copies the trunk, `ln_pre`, `ln_post` and `proj`; every CLS_s = the teacher's class embedding plus
    its position embedding 0; grid position embeddings = the teacher's, resized bilinearly to the grid;
    level embeddings start at zero; stage projections from `stage_projection_init`.

    Args:
        teacher: open_clip CLIP or VisionTransformer.
        config: the student's config (default: the `waveclip-vit-b-16` preset with the teacher's trunk
            sizes); its trunk sizes must match the teacher's.
        impl: kernel impl of the student.
    """
    visual = _visual(teacher)
    trunk = trunk_config(visual)
    if config is None:
        config = dataclasses.replace(PRESETS["waveclip-vit-b-16"], **trunk)
    mismatched = {
        k: (getattr(config, k), v) for k, v in trunk.items() if k != "teacher_patch_size" and getattr(config, k) != v
    }
    if mismatched:
        detail = ", ".join(f"{k}: config {a} vs teacher {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the config's trunk does not match the teacher's ({detail})")
    student = WaveCLIP(config, impl=impl).to(device=visual.proj.device, dtype=visual.proj.dtype)
    with torch.no_grad():
        student.transformer.load_state_dict(visual.transformer.state_dict())
        student.ln_pre.load_state_dict(visual.ln_pre.state_dict())
        student.ln_post.load_state_dict(visual.ln_post.state_dict())
        student.proj.copy_(visual.proj)
        pos = visual.positional_embedding
        student.class_embedding.copy_((visual.class_embedding + pos[0]).expand_as(student.class_embedding))
        student.positional_embedding.copy_(resize_positional_embedding(pos[1:], tuple(visual.grid_size), config.grid))
        student.level_embedding.zero_()
        for proj, weight in zip(student.stage_proj, stage_projection_init(visual.conv1.weight, config)):
            proj.weight.copy_(weight)
    return student


# ------------------------------------------------------------------------------------ checkpoints


def save_pretrained(model: WaveCLIP, directory: str | os.PathLike) -> None:
    """`directory/model.safetensors` (the state dict) and `directory/config.json`."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(model.config.to_json())


def load_pretrained(directory: str | os.PathLike, impl: str = "auto", device: str | torch.device = "cpu") -> WaveCLIP:
    """The tower written by `save_pretrained`, in the dtype it was saved in."""
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a WaveCLIP checkpoint: {name} is missing")
    config = WaveCLIPConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    model = WaveCLIP(config, impl=impl).to(device=device, dtype=state["proj"].dtype)
    model.load_state_dict(state)
    return model.eval()
