"""Images rebuilt coarse to fine from their wavelet tokens, and the PNG grid that shows them.

Used by `waveclip tokenize` and `waveclip demo`.
"""

from __future__ import annotations

import torch

import waveclip_kernels as wk
from waveclip.images import denormalize


def progressive_reconstructions(tokens: list[torch.Tensor], levels: int, grid, image_size, color="ycbcr"):
    """Images rebuilt from stage 0, stages 0-1, ..., all stages (later stages zeroed)."""
    out = []
    for keep in range(levels + 1):
        partial = [t if s <= keep else torch.zeros_like(t) for s, t in enumerate(tokens)]
        out.append(wk.wavelet_detokenize(partial, levels, grid, color=color, image_size=image_size))
    return out


def save_reconstruction_grid(path, names, originals, reconstructions) -> None:
    """One row per image: original, then coarse-to-fine reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(reconstructions)
    fig, axes = plt.subplots(len(names), cols, figsize=(2.4 * cols, 2.5 * len(names)), squeeze=False)
    titles = ["original"] + [f"stages 0-{k}" if k else "stage 0" for k in range(len(reconstructions))]
    for row, name in enumerate(names):
        panels = [originals[row]] + [r[row] for r in reconstructions]
        for col, img in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(denormalize(img[None].float())[0].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
            if col == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
