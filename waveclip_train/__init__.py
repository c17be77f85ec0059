"""waveclip_train: distillation of a WaveCLIP tower from a frozen CLIP teacher, and gate calibration.

    from waveclip_train import DistillOptions
    from waveclip_train.distill import distill

    result = distill(DistillOptions(data=["photos/"], out="runs/student", teacher_weights="vit_b_16.safetensors"))

Modules: `options` (the run options, validated), `data` (image sources and datasets), `teacher` (the
frozen teacher, its identity and embedding cache), `loss`, `optim` (AdamW groups and schedule),
`distributed` (torchrun process group and sampler), `checkpoint` (save, load, resume), `train_log`,
`evaluate`, `distill` (the loop) and `calibrate` (the gate's thresholds). It builds on `waveclip`
(inference) and `waveclip_kernels`, is never imported by them, and parses no command line.
"""

from .options import CalibrateOptions, DistillOptions

__all__ = ["CalibrateOptions", "DistillOptions"]
