"""The `waveclip` command line, run in-process on tiny inputs: the parser, flops, tokenize, bench, delegates."""

import csv
import re
import sys

import pytest
import torch
from PIL import Image

from waveclip import flops
from waveclip.config import WaveCLIPConfig
from waveclip_cli.main import COMMANDS, main

EVERY_COMMAND = {"classify", "tokenize", "flops", "bench", "demo", "distill", "calibrate"}


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^ {4}(\w+)(?: {2,}\S|$)", out, flags=re.MULTILINE))  # the sub-command list
    assert listed == EVERY_COMMAND, out
    assert {name for name, _, _ in COMMANDS} == EVERY_COMMAND


@pytest.mark.parametrize("command", sorted(EVERY_COMMAND))
def test_command_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: waveclip {command}" in capsys.readouterr().out


def test_flops_table_matches_the_accounting(cli):
    code, out, _ = cli("flops")
    assert code == 0
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    expected = flops.exit_gflops(cfg)
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert [float(r[2]) for r in rows] == pytest.approx(expected, rel=1e-3)
    percents = [float(r[4].rstrip("%")) for r in rows]
    assert percents == pytest.approx([24.5, 49.2, 74.3, 100.0], abs=0.1)


def test_flops_per_input_size(cli):
    code, out, _ = cli("flops", "--preset", "waveclip-tiny")
    assert code == 0
    cfg = WaveCLIPConfig.from_preset("waveclip-tiny")
    rows = {m[0]: m[1].split() for m in re.findall(r"^\s*(\d+x\d+)\s+(.*)$", out, flags=re.MULTILINE)}
    assert list(rows) == ["32x32", "16x16", "8x8"]
    for k, cells in enumerate(rows.values()):
        side = 32 >> k
        expected = flops.exit_gflops(cfg, image_size=(side, side))
        assert len(expected) == 3 - k and cells[len(expected) :] == ["-"] * k
        assert [float(c) for c in cells[: len(expected)]] == pytest.approx(expected, rel=1e-3)


def test_flops_writes_csv(cli, tmp_path):
    code, _, _ = cli("flops", "--preset", "waveclip-vit-b-16-448", "--out", tmp_path)
    assert code == 0
    with (tmp_path / "flops.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16-448")
    assert [float(r["gflops"]) for r in rows] == pytest.approx(flops.exit_gflops(cfg), rel=1e-5)
    assert rows[0]["torch"] == torch.__version__ and rows[0]["date"]


def test_unknown_preset_is_one_line(cli):
    cli.error("unknown preset 'vit-huge'.*waveclip-vit-b-16", "flops", "--preset", "vit-huge")


def test_tokenize_saves_the_reconstructions(cli, photo, tmp_path):
    out_png = tmp_path / "figs" / "recon.png"
    code, out, _ = cli("tokenize", photo[0], "--out", out_png, "--size", "64", "--levels", "2")
    assert code == 0
    assert out_png.is_file() and Image.open(out_png).size[0] > 100
    shapes = re.findall(r"stage (\d): tokens \((\d+), (\d+), (\d+)\)", out)
    assert [tuple(map(int, s)) for s in shapes] == [(0, 1, 16, 48), (1, 1, 16, 144), (2, 1, 16, 576)]
    errors = [float(e) for e in re.findall(r"max \|error\| (\S+)", out)]
    assert len(errors) == 3 and errors[0] > 1e-2 and errors[-1] < 1e-4  # coarse is lossy, all stages exact


def test_tokenize_errors_are_one_line(cli, photo, tmp_path):
    out = ("--out", tmp_path / "o.png")
    cli.error("no such image file", "tokenize", tmp_path / "missing.png", *out)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    cli.error("cannot read image", "tokenize", broken, *out)
    cli.error("does not tile.*nearest valid", "tokenize", photo[0], *out, "--size", "100")
    cli.error("--out must end in", "tokenize", photo[0], "--out", tmp_path / "o.txt")
    cli.error("--save must end in .safetensors", "tokenize", photo[0], "--save", tmp_path / "t.pt")
    cli.error("nothing to do", "tokenize", photo[0])
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (("--size", "0"), "--size must be a positive"),
        (("--size", "-3"), "--size must be a positive"),
        (("--levels", "-1"), "--levels must be >= 0"),
        (("--grid", "0"), "--grid must be >= 1"),
        (("--size", "16", "--levels", "5"), "does not tile.*nearest valid heights: 32"),
    ],
)
def test_tokenize_sizes_that_cannot_run_are_one_line(cli, photo, tmp_path, options, pattern):
    cli.error(pattern, "tokenize", photo[0], "--out", tmp_path / "o.png", *options)


def test_tokenize_default_grid_is_at_least_one(cli, photo, tmp_path):
    # 64 / 2**5 / 4 rounds down to 0: the default grid is 1, which 64 px tiles at 5 levels.
    code, out, err = cli("tokenize", photo[0], "--out", tmp_path / "o.png", "--size", "64", "--levels", "5")
    assert code == 0, err
    assert "grid 1x1" in out and len(re.findall(r"stage \d: tokens \(1, 1, ", out)) == 6


def test_bench_quick_tokenizer_writes_csv_png_and_tables(cli, tmp_path):
    code, _, _ = cli("bench", "--op", "tokenizer", "--quick", "--out", tmp_path)
    assert code == 0
    with (tmp_path / "tokenizer.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_provider = {r["provider"]: r for r in rows}
    assert {"waveclip:reference", "pytorch_wavelets", "ptwt", "copy"} <= set(by_provider)
    assert by_provider["waveclip:triton"]["status"] == "skipped"
    for name in ("waveclip:reference", "pytorch_wavelets", "ptwt"):
        assert by_provider[name]["status"] == "ok" and float(by_provider[name]["max_err"]) < 1e-5
    assert float(by_provider["copy"]["frac_copy"]) == 1.0
    for name in ("waveclip:reference", "ptwt", "copy"):
        assert float(by_provider[name]["frac_copy_alt"]) > 0
    assert rows[0]["torch"] == torch.__version__ and rows[0]["device"].startswith("CPU")
    assert (tmp_path / "tokenizer.png").is_file() and (tmp_path / "flops.csv").is_file()
    tables = (tmp_path / "README_tables.md").read_text()
    assert "### Wavelet tokenizer" in tables and "| ptwt | conv2d |" in tables
    assert "### GFLOPs per exit" in tables


@pytest.mark.parametrize("op", ["model", "gate", "all"])
def test_bench_of_a_preset_without_teacher_is_one_line(cli, tmp_path, op):
    line = cli.error(
        "preset waveclip-tiny has no open_clip teacher", "bench", "--op", op, "--preset", "waveclip-tiny", "--quick",
        "--out", tmp_path,
    )  # fmt: skip
    assert len(line) < 300
    assert not any(tmp_path.iterdir())  # refused before any benchmark ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_bench_on_cuda_without_a_gpu_is_one_line(cli, tmp_path):
    cli.error("no CUDA device", "bench", "--device", "cuda", "--out", tmp_path)


def test_distill_and_calibrate_take_their_options_from_their_modules(capsys):
    for command, option in (("distill", "--teacher-weights"), ("calibrate", "--checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: waveclip {command}" in out and option in out


def test_missing_command_module_is_one_line(cli, monkeypatch):
    module = dict((name, path) for name, path, _ in COMMANDS)["calibrate"]
    monkeypatch.setitem(sys.modules, module, None)
    cli.error(f"waveclip calibrate.*not available: {module} is missing", "calibrate", "--checkpoint", "x")


def test_every_command_module_has_the_interface():
    import importlib

    for _, path, _ in COMMANDS:
        module = importlib.import_module(path)
        assert callable(module.add_arguments) and callable(module.run), path


def test_time_interleaved_alternates_the_calls_and_returns_each_median():
    import time

    from bench import common

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")

    slow_timing, fast_timing = common.time_interleaved([slow, fast], "cpu", warmup=1, budget_s=0.05)
    timed = calls[4:]  # after one warm-up call and one estimate call of each
    assert len(timed) >= 10 and timed == ["slow", "fast"] * (len(timed) // 2)
    assert slow_timing.ms >= 4.0 > 1.0 > fast_timing.ms and slow_timing.reps == len(timed) // 2


def test_tables_flag_a_kernel_worse_than_twice_pytorch(tmp_path):
    from bench import common, tables

    base = {"bench": "tokenizer", "case": "B=1", "status": "ok", "ms": 1.0}
    rows = [
        base | {"provider": "ptwt", "backend": "conv2d", "max_err": 1e-3},
        base | {"provider": "waveclip:cpu", "backend": "cpu", "max_err": 1.5e-3},
        base | {"provider": "waveclip:reference", "backend": "reference", "max_err": 3e-3},
        base | {"provider": "waveclip:triton", "backend": "triton", "status": "skipped", "note": "why"},
    ]
    common.write_csv(tmp_path / "tokenizer.csv", rows, "cpu")
    problems = tables.check_errors(tmp_path)
    assert len(problems) == 1 and "waveclip:reference" in problems[0]
    markdown = tables.tables_markdown(tmp_path)
    assert "| waveclip:cpu | cpu | 1 |" in markdown
    assert "| waveclip:triton | triton |" in markdown and "skipped: why" in markdown
