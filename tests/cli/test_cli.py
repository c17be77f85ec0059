"""The `waveclip` command line, run in-process on tiny inputs."""

import csv
import re
import sys

import pytest
import torch
from PIL import Image

from waveclip import flops
from waveclip.config import WaveCLIPConfig
from waveclip_cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("waveclip")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err


@pytest.fixture
def photo(tmp_path):
    """A real photograph (scikit-image's astronaut) saved as PNG, plus a small second one."""
    import skimage.data

    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    small = tmp_path / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).resize((120, 80)).save(small)
    return path, small


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("classify", "tokenize", "flops", "bench", "distill", "calibrate"):
        assert command in out


@pytest.mark.parametrize("command", ["classify", "tokenize", "flops", "bench"])
def test_command_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: waveclip {command}" in capsys.readouterr().out


def test_flops_table_matches_the_accounting(capsys):
    code, out, _ = run(capsys, "flops")
    assert code == 0
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16")
    expected = flops.exit_gflops(cfg)
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert [float(r[2]) for r in rows] == pytest.approx(expected, rel=1e-3)
    percents = [float(r[4].rstrip("%")) for r in rows]
    assert percents == pytest.approx([24.5, 49.2, 74.3, 100.0], abs=0.1)


def test_flops_writes_csv(capsys, tmp_path):
    code, _, _ = run(capsys, "flops", "--preset", "waveclip-vit-b-16-448", "--out", str(tmp_path))
    assert code == 0
    with (tmp_path / "flops.csv").open() as f:
        rows = list(csv.DictReader(f))
    cfg = WaveCLIPConfig.from_preset("waveclip-vit-b-16-448")
    assert [float(r["gflops"]) for r in rows] == pytest.approx(flops.exit_gflops(cfg), rel=1e-5)
    assert rows[0]["torch"] == torch.__version__ and rows[0]["date"]


def test_unknown_preset_is_one_line(capsys):
    code, _, err = run(capsys, "flops", "--preset", "vit-huge")
    assert_one_line_error(code, err, "unknown preset 'vit-huge'.*waveclip-vit-b-16")


def test_tokenize_saves_the_reconstructions(capsys, photo, tmp_path):
    out_png = tmp_path / "figs" / "recon.png"
    code, out, _ = run(capsys, "tokenize", str(photo[0]), "--out", str(out_png), "--size", "64", "--levels", "2")
    assert code == 0
    assert out_png.is_file() and Image.open(out_png).size[0] > 100
    shapes = re.findall(r"stage (\d): tokens \((\d+), (\d+), (\d+)\)", out)
    assert [tuple(map(int, s)) for s in shapes] == [(0, 1, 16, 48), (1, 1, 16, 144), (2, 1, 16, 576)]
    errors = [float(e) for e in re.findall(r"max \|error\| (\S+)", out)]
    assert len(errors) == 3 and errors[0] > 1e-2 and errors[-1] < 1e-4  # coarse is lossy, all stages exact


def test_tokenize_errors_are_one_line(capsys, photo, tmp_path):
    code, _, err = run(capsys, "tokenize", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "no such image file")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, _, err = run(capsys, "tokenize", str(broken), "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "cannot read image")
    code, _, err = run(capsys, "tokenize", str(photo[0]), "--out", str(tmp_path / "o.png"), "--size", "100")
    assert_one_line_error(code, err, "does not tile.*nearest valid")
    code, _, err = run(capsys, "tokenize", str(photo[0]), "--out", str(tmp_path / "o.txt"))
    assert_one_line_error(code, err, "--out must end in")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from waveclip import WaveCLIP

    torch.manual_seed(0)
    directory = tmp_path / "tiny"
    WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("thresholds", "stage"), [("0,0", 0), ("2,2", 2)])
def test_classify_with_a_checkpoint_follows_the_gate(capsys, photo, tiny_checkpoint, thresholds, stage):
    images = [str(p) for p in photo]
    argv = ["classify", *images, "--labels", "cat,dog,car", "--checkpoint", str(tiny_checkpoint)]
    code, out, _ = run(capsys, *argv, "--thresholds", thresholds, "--impl", "reference")
    assert code == 0
    assert "class embeddings are RANDOM" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in images]
    assert [r[0] for r in rows] == images
    assert all(r[1] in ("cat", "dog", "car") and 0 < float(r[2]) <= 1 for r in rows)
    assert [int(r[3]) for r in rows] == [stage, stage]  # tau 0: everyone leaves at once; tau 2: nobody can
    cfg = WaveCLIPConfig.from_preset("waveclip-tiny")
    assert float(rows[0][4]) == pytest.approx(flops.exit_gflops(cfg)[stage], rel=1e-3)


def test_classify_errors_are_one_line(capsys, photo, tiny_checkpoint, tmp_path):
    image = str(photo[0])
    code, _, err = run(capsys, "classify", image, "--labels", "a,b", "--checkpoint", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "no such checkpoint folder")
    code, _, err = run(capsys, "classify", image, "--labels", "a,b", "--checkpoint", str(tiny_checkpoint),
                       "--thresholds", "0.5")  # fmt: skip
    assert_one_line_error(code, err, "--thresholds needs 2 values")
    code, _, err = run(capsys, "classify", str(tmp_path / "none.jpg"), "--labels", "a,b")
    assert_one_line_error(code, err, "no such image file")
    code, _, err = run(capsys, "classify", image, "--labels", " , ")
    assert_one_line_error(code, err, "--labels needs at least one class")
    code, _, err = run(capsys, "classify", image, "--labels", "a,b", "--preset", "nope")
    assert_one_line_error(code, err, "unknown preset")


@pytest.mark.slow
def test_classify_with_a_random_teacher_says_so(capsys, photo):
    code, out, _ = run(capsys, "classify", str(photo[1]), "--labels", "cup,cat", "--impl", "reference")
    assert code == 0
    assert "RANDOM weights (no --teacher-weights)" in out
    assert re.search(r"coffee\.jpg\s+(cup|cat)\s+\d\.\d+\s+\d\s+\d+\.\d+", out)


def test_bench_quick_tokenizer_writes_csv_png_and_tables(capsys, tmp_path):
    code, _, _ = run(capsys, "bench", "--op", "tokenizer", "--quick", "--out", str(tmp_path))
    assert code == 0
    with (tmp_path / "tokenizer.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_provider = {r["provider"]: r for r in rows}
    assert {"waveclip:reference", "pytorch_wavelets", "ptwt", "copy"} <= set(by_provider)
    assert by_provider["waveclip:triton"]["status"] == "skipped"
    for name in ("waveclip:reference", "pytorch_wavelets", "ptwt"):
        assert by_provider[name]["status"] == "ok" and float(by_provider[name]["max_err"]) < 1e-5
    assert float(by_provider["copy"]["frac_copy"]) == 1.0
    assert rows[0]["torch"] == torch.__version__ and rows[0]["device"].startswith("CPU")
    assert (tmp_path / "tokenizer.png").is_file() and (tmp_path / "flops.csv").is_file()
    tables = (tmp_path / "README_tables.md").read_text()
    assert "### Wavelet tokenizer" in tables and "| ptwt | conv2d |" in tables
    assert "### GFLOPs per exit" in tables


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_bench_on_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "--device", "cuda", "--out", str(tmp_path))
    assert_one_line_error(code, err, "no CUDA device")


def test_distill_and_calibrate_delegate_their_options(capsys):
    for command, option in (("distill", "--teacher-weights"), ("calibrate", "--checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: waveclip {command}" in out and option in out


def test_missing_delegate_module_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "waveclip_cli.calibrate", None)
    code, _, err = run(capsys, "calibrate", "--checkpoint", "x")
    assert_one_line_error(code, err, "waveclip calibrate.*not available")


def _bench_tables():
    from waveclip_cli.main import _bench_module

    return _bench_module("common"), _bench_module("tables")


def test_tables_flag_a_kernel_worse_than_twice_pytorch(tmp_path):
    common, tables = _bench_tables()
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
