"""The main job: WaveCLIP's tokenizer (and model) on real photographs.

    python -m waveclip.demo --out outputs

Tokenizes scikit-image's sample photographs, prints each stage's token shapes and the
reconstruction error, and saves a PNG of the images rebuilt coarse to fine.
"""

from __future__ import annotations

import argparse
import pathlib

import torch

import waveclip_kernels as wk

from .images import denormalize, preprocess, sample_images


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


def tokenizer_demo(out_dir: pathlib.Path, levels: int = 3, grid: int = 7, size: int = 224) -> None:
    photos = sample_images()
    names = list(photos)
    x = preprocess(list(photos.values()), size)
    impl = wk.resolve_impl("auto", "wavelet_tokenize", x.device)
    print(f"Tokenizer: {len(names)} photographs {tuple(x.shape)}, L={levels}, grid {grid}x{grid}, impl={impl}")
    tokens = wk.wavelet_tokenize(x, levels, grid)
    for s, t in enumerate(tokens):
        what = f"A_{levels}" if s == 0 else f"(H, V, D) of level {levels - s + 1}"
        print(f"  stage {s}: tokens {tuple(t.shape)}  from {what}")
    recon = progressive_reconstructions(tokens, levels, (grid, grid), (size, size))
    for k, r in enumerate(recon):
        err = (r - x).abs().amax(dim=(1, 2, 3))
        label = "stage 0" if k == 0 else f"stages 0-{k}"
        print(f"  rebuilt from {label:<11} max |error| per image: " + ", ".join(f"{e:.2e}" for e in err.tolist()))
    path = out_dir / "reconstructions.png"
    save_reconstruction_grid(path, names, x, recon)
    print(f"  saved {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_demo(out_dir)


if __name__ == "__main__":
    main()
