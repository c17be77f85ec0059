"""`waveclip classify` under torchrun: two CPU processes on gloo write the file one process writes."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    return env


def _run(command, cwd):
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_two_ranks_write_the_file_one_process_writes(photo_folder, tiny_checkpoint, tmp_path):
    args = ["classify", str(photo_folder), "--labels", "cat,dog,car", "--checkpoint", str(tiny_checkpoint),
            "--impl", "reference", "--thresholds", "0.999,0.999", "--batch-size", "1"]  # fmt: skip
    one = _run([sys.executable, "-m", "waveclip", *args, "--out", str(tmp_path / "one.csv")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip
    two = _run([*torchrun, "-m", "waveclip", *args, "--out", str(tmp_path / "two.csv")], tmp_path)
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    assert (tmp_path / "one_exits.csv").read_text() == (tmp_path / "two_exits.csv").read_text()
    assert len((tmp_path / "one.csv").read_text().splitlines()) == 1 + 5
    assert two.count("wrote ") == 1 and one.count("wrote ") == 1  # only rank 0 reports and writes
