"""waveclip: a CLIP vision tower with wavelet tokens, coarse-to-fine answers and early exit."""

from .cache import InferenceState
from .config import PRESETS, WaveCLIPConfig
from .interop import from_open_clip, load_teacher
from .model import WaveCLIP
from .zeroshot import Prediction, ZeroShotClassifier, class_text_embeddings

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "InferenceState",
    "Prediction",
    "WaveCLIP",
    "WaveCLIPConfig",
    "ZeroShotClassifier",
    "class_text_embeddings",
    "from_open_clip",
    "load_teacher",
]
