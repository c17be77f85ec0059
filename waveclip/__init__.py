"""waveclip: a CLIP vision tower with wavelet tokens, coarse-to-fine answers and early exit."""

__version__ = "0.1.0"
