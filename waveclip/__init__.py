"""waveclip: a CLIP vision tower with wavelet tokens, coarse-to-fine answers and early exit.

Inference only. `import waveclip`, the tower, its incremental pass and its checkpoints need torch and
safetensors alone; open_clip is imported where a teacher is (its text tower, `load_teacher`,
`create_model_and_transforms`), fvcore only by `flops`' FLOP counter.
"""

from .cache import InferenceState
from .clip import WaveCLIPModel, create_model_and_transforms, get_tokenizer
from .config import PRESETS, TINY_TEACHER, WaveCLIPConfig
from .interop import from_open_clip, load_paired_teacher, load_teacher
from .model import WaveCLIP
from .zeroshot import Prediction, ZeroShotClassifier, class_text_embeddings

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "TINY_TEACHER",
    "InferenceState",
    "Prediction",
    "WaveCLIP",
    "WaveCLIPConfig",
    "WaveCLIPModel",
    "ZeroShotClassifier",
    "class_text_embeddings",
    "create_model_and_transforms",
    "from_open_clip",
    "get_tokenizer",
    "load_paired_teacher",
    "load_teacher",
]
