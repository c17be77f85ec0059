"""waveclip_train: distillation of a WaveCLIP tower from a frozen CLIP teacher, and gate calibration.

It builds on `waveclip` (inference) and is never imported by it.
"""
