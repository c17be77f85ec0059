"""Initialising a student tower from a CLIP teacher (docs/design.md section 2), in plain PyTorch.

The student takes the teacher's trunk, `ln_pre`, `ln_post` and `proj` as they are. Its stage
projections are set analytically (`stage_projection_init`) so that, for every grid cell, the sum over
stages of `W_s @ token_s` is the mean of the teacher's patch embeddings over that cell.

The teacher is an open_clip model, but nothing here imports open_clip: the functions read the
attributes of its modules. Loading a teacher is `waveclip.interop`'s job.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import waveclip_kernels as wk
from waveclip_kernels.common import color_matrix

from .config import WaveCLIPConfig

# The attribute `interop.load_teacher` sets on a teacher: the WaveCLIPConfig fields that say which
# teacher it is ("teacher", "teacher_config", "teacher_weights").
TEACHER_RECORD = "waveclip_teacher"


def visual_tower(teacher: nn.Module) -> nn.Module:
    """The open_clip VisionTransformer of a CLIP (or the tower itself), checked to be one we can copy."""
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
    visual = visual_tower(teacher)
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


def text_tower_sha256(teacher: nn.Module) -> str | None:
    """sha256 of a CLIP's text tower: every state-dict entry outside `visual.`, as float32, by name.

    None when the module has no text tower (an image tower alone).
    """
    entries = sorted((k, v) for k, v in teacher.state_dict().items() if not k.startswith("visual."))
    if not hasattr(teacher, "encode_text") or not entries:
        return None
    h = hashlib.sha256()
    for name, value in entries:
        h.update(name.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


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


def check_trunk(config: WaveCLIPConfig, teacher: nn.Module) -> None:
    """Raise a ValueError naming every trunk size where `config` and the teacher differ."""
    mismatched = {k: (getattr(config, k), v) for k, v in trunk_config(teacher).items() if getattr(config, k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: config {a} vs teacher {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the config's trunk does not match the teacher's ({detail})")


@torch.no_grad()
def copy_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Set a freshly built student's parameters from the teacher (see the module docstring).

    Copies the trunk, `ln_pre`, `ln_post` and `proj`; every CLS_s = the teacher's class embedding plus
    its position embedding 0; grid position embeddings = the teacher's, resized bilinearly to the grid;
    level embeddings start at zero; stage projections from `stage_projection_init`.
    """
    visual, config = visual_tower(teacher), student.config
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
