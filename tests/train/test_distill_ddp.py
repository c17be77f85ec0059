"""Distillation under torchrun: `torchrun --nproc_per_node 2 -m waveclip_cli.distill` (2 CPU processes, gloo)
follows the single-process run with the same global batch.

Each logged loss is the mean over both ranks of what each rank's own copy of the student gives on its
shard, so matching the single process step by step means both copies follow its trajectory.
"""

import argparse
import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from waveclip_cli.distill import add_arguments, options_from_args
from waveclip_train.distill import distill

TINY_TEACHER = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
STEPS = 4  # crosses an epoch boundary: 12 images, global batch 4, 3 steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_argv(tmp_path, out, batch_size, accum_steps):
    return [
        "--teacher", str(tmp_path / "tiny-ddp-teacher.json"),
        "--preset", "waveclip-tiny",
        "--data", str(tmp_path / "images"),
        "--out", str(out),
        "--steps", str(STEPS),
        "--batch-size", str(batch_size),
        "--accum-steps", str(accum_steps),
        "--lr", "1e-3",
        "--lr-new", "3e-3",
        "--warmup-steps", "1",
        "--device", "cpu",
        "--impl", "reference",
        "--num-workers", "0",
        "--eval-images", "4",
        "--no-progress",
    ]  # fmt: skip


def losses(out):
    with open(out / "train_log.csv") as f:
        return np.array([[float(x) for x in row[4:]] for row in list(csv.reader(f))[1:]])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    (tmp_path / "tiny-ddp-teacher.json").write_text(json.dumps(TINY_TEACHER))
    (tmp_path / "images").mkdir()
    gen = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(gen.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")

    # 2 processes x micro-batch 1 x 2 accumulation steps: global batch 4, with DDP's no_sync path.
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "waveclip_cli.distill"]
    cmd += distill_argv(tmp_path, ddp_out, batch_size=1, accum_steps=2)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 1 x 2 accumulation" in proc.stdout  # both processes joined one group

    # One process with the same global batch of 4.
    single_out = tmp_path / "single"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    distill(options_from_args(parser.parse_args(distill_argv(tmp_path, single_out, batch_size=4, accum_steps=1))))
    a, b = losses(ddp_out), losses(single_out)
    assert a.shape == b.shape == (STEPS, 1 + 3)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # total loss and 1 - cos per exit, every step
    ddp, single = load_file(ddp_out / "model.safetensors"), load_file(single_out / "model.safetensors")
    assert ddp.keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
