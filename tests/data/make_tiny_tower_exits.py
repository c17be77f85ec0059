"""Regenerate tests/data/tiny_tower_exits.json: the exits of the seeded tiny tower on seeded images.

Run only when the model's intended output changes (and say why in the commit):
    PYTHONPATH=.:tests python tests/data/make_tiny_tower_exits.py
"""

import json
from pathlib import Path

import torch
from helpers import GOLDEN_SEED, seeded_images, seeded_tiny_tower


def main() -> None:
    model = seeded_tiny_tower()
    with torch.no_grad():
        exits = model(seeded_images(), impl="reference")
    record = {
        "preset": "waveclip-tiny",
        "seed": GOLDEN_SEED,
        "dtype": "float64",
        "shape": list(exits.shape),
        "exits": exits.tolist(),
    }
    path = Path(__file__).with_name("tiny_tower_exits.json")
    path.write_text(json.dumps(record) + "\n")
    print(f"wrote {path} ({tuple(exits.shape)})")


if __name__ == "__main__":
    main()
