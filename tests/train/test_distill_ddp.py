"""Distillation under torchrun: 2 CPU processes (gloo) hold identical weights and follow the single-process run.

The test launches this file as the torchrun worker script: each rank runs `waveclip distill`'s options
through `distill()` and saves the weights it ends with, so the test can compare the ranks.
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
from safetensors.torch import load_file, save_file

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
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--dump", str(ddp_out)]
    cmd += distill_argv(tmp_path, ddp_out, batch_size=1, accum_steps=2)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = load_file(ddp_out / "rank0.safetensors"), load_file(ddp_out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k

    # One process with the same global batch of 4.
    from waveclip_train.distill import add_arguments, distill, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    single_out = tmp_path / "single"
    single = distill(
        options_from_args(parser.parse_args(distill_argv(tmp_path, single_out, batch_size=4, accum_steps=1)))
    )
    a, b = losses(ddp_out), losses(single_out)
    assert a.shape == b.shape == (STEPS, 1 + 3)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # total loss and 1 - cos per exit, every step
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(rank0[k], v, rtol=1e-4, atol=1e-5)


def worker(argv) -> int:
    """torchrun entry: run the distillation, then save this rank's weights for the test to compare."""
    from waveclip_train.distill import add_arguments, distill, options_from_args

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dump", required=True)
    known, rest = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    result = distill(options_from_args(parser.parse_args(rest)))
    rank = torch.distributed.get_rank()
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(known.dump, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
