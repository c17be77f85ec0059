"""`waveclip classify`: inputs, options checked before loading, checkpoint errors, CSV output, seeding,
precision, the native-resolution mode."""

import csv
import pathlib
import re

import pytest
import torch
from PIL import Image

from waveclip import flops
from waveclip.config import WaveCLIPConfig
from waveclip.model import WaveCLIP
from waveclip_cli.common import resolve_precision
from waveclip_cli.inputs import native_size

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")


def _rows(out: str, paths) -> list[list[str]]:
    names = {str(p) for p in paths}
    return [line.split() for line in out.splitlines() if line.split() and line.split()[0] in names]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _classify(cli, checkpoint, *argv):
    """`waveclip classify ARGV... --labels cat,dog,car --checkpoint CHECKPOINT --impl reference`."""
    return cli("classify", *argv, "--labels", "cat,dog,car", "--checkpoint", checkpoint, "--impl", "reference")


@pytest.mark.parametrize(("thresholds", "stage"), [("0,0", 0), ("2,2", 2)])
def test_classify_with_a_checkpoint_follows_the_gate(cli, photo, tiny_checkpoint, thresholds, stage):
    code, out, _ = _classify(cli, tiny_checkpoint, *photo, "--thresholds", thresholds)
    assert code == 0
    assert "class embeddings are RANDOM" in out and "precision: fp32" in out
    rows = _rows(out, photo)
    assert [r[0] for r in rows] == [str(p) for p in photo]
    assert all(r[1] in ("cat", "dog", "car") and 0 < float(r[2]) <= 1 for r in rows)
    assert [int(r[3]) for r in rows] == [stage, stage]  # tau 0: everyone leaves at once; tau 2: nobody can
    assert float(rows[0][4]) == pytest.approx(flops.exit_gflops(TINY)[stage], rel=1e-3)


def test_classify_errors_are_one_line(cli, photo, tiny_checkpoint, tmp_path):
    image = photo[0]
    cli.error("no such checkpoint folder", "classify", image, "--labels", "a,b", "--checkpoint", tmp_path / "nowhere")
    cli.error(
        "--thresholds needs 2 values",
        "classify",
        image,
        "--labels",
        "a,b",
        "--checkpoint",
        tiny_checkpoint,
        "--thresholds",
        "0.5",
    )
    cli.error("no such image file or folder", "classify", tmp_path / "none.jpg", "--labels", "a,b")
    cli.error("--labels needs at least one class", "classify", image, "--labels", " , ")
    cli.error("--labels has duplicate", "classify", image, "--labels", "a,b,a")
    cli.error("unknown preset", "classify", image, "--labels", "a,b", "--preset", "nope")
    cli.error("--out must end in .csv", "classify", image, "--labels", "a,b", "--out", tmp_path / "p.txt")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to build or load a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(WaveCLIP, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(WaveCLIP, "from_open_clip", classmethod(refuse))
    monkeypatch.setattr("waveclip.interop.load_teacher", refuse)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
        (("--workers", "-1"), "--workers must be >= 0"),
        (("--device", "meta"), "--device meta: only cpu, cuda and cuda:N"),
        (("--device", "toaster"), "--device 'toaster' is not a device"),
    ],
)
def test_bad_options_are_refused_before_loading_anything(
    cli, photo, tiny_checkpoint, no_model_loading, options, pattern
):
    cli.error(pattern, "classify", photo[0], "--labels", "a,b", "--checkpoint", tiny_checkpoint, *options)


def test_missing_input_is_refused_before_loading_anything(cli, photo, tiny_checkpoint, no_model_loading, tmp_path):
    cli.error(
        "no such image file or folder: .*gone.png",
        "classify",
        photo[0],
        tmp_path / "gone.png",
        "--labels",
        "a,b",
        "--checkpoint",
        tiny_checkpoint,
    )


def _checkpoint_copy(tmp_path, tiny_checkpoint, name):
    import shutil

    return pathlib.Path(shutil.copytree(tiny_checkpoint, tmp_path / name))


def test_corrupt_weights_are_one_line_naming_the_checkpoint(cli, photo, tiny_checkpoint, tmp_path):
    broken = _checkpoint_copy(tmp_path, tiny_checkpoint, "corrupt")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cli.error(re.escape(str(broken)), "classify", photo[0], "--labels", "a,b", "--checkpoint", broken)


def test_unknown_config_key_is_one_line_naming_the_checkpoint(cli, photo, tiny_checkpoint, tmp_path):
    broken = _checkpoint_copy(tmp_path, tiny_checkpoint, "unknown-key")
    config = (broken / "config.json").read_text().replace('"levels"', '"colour_space": "hsv",\n  "levels"')
    (broken / "config.json").write_text(config)
    cli.error(re.escape(str(broken)), "classify", photo[0], "--labels", "a,b", "--checkpoint", broken)


@pytest.mark.parametrize(("damage", "file"), [("weights", "model.safetensors"), ("config", "config.json")])
def test_checkpoint_errors_name_the_file(cli, photo, tiny_checkpoint, tmp_path, damage, file):
    broken = _checkpoint_copy(tmp_path, tiny_checkpoint, damage)
    if damage == "weights":
        (broken / file).write_bytes(b"not a safetensors file")
    else:
        (broken / file).write_text((broken / file).read_text().replace('"levels"', '"colour_space": 1, "levels"'))
    cli.error(re.escape(str(broken / file)), "classify", photo[0], "--labels", "a,b", "--checkpoint", broken)


def test_checkpoint_error_is_shown_whole_on_one_line(cli, photo, tiny_checkpoint, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError(f"{tiny_checkpoint}/model.safetensors is not a WaveCLIP checkpoint:\n  no tensor 'proj'")

    monkeypatch.setattr(WaveCLIP, "from_pretrained", classmethod(fail))
    line = cli.error(
        "model.safetensors is not a WaveCLIP checkpoint: no tensor 'proj'",
        "classify",
        photo[0],
        "--labels",
        "a,b",
        "--checkpoint",
        tiny_checkpoint,
    )
    assert line.count(str(tiny_checkpoint)) == 1  # shown as it is, not wrapped again


def test_decompression_bomb_is_one_line(cli, photo, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 96 x 96 photograph is then > 2 x the limit
    cli.error(
        r"cannot read image .*astronaut\.png: Image size \(9216 pixels\) exceeds limit",
        "classify",
        photo[0],
        "--labels",
        "a,b",
        "--checkpoint",
        tiny_checkpoint,
    )


def test_folders_are_walked_recursively_and_lists_are_read(cli, photo_folder, photo, tiny_checkpoint, tmp_path):
    expected = sorted(p for p in photo_folder.rglob("*.*") if p.suffix != ".md")
    assert len(expected) == 5
    code, out, err = _classify(cli, tiny_checkpoint, photo_folder)
    assert code == 0, err
    assert [r[0] for r in _rows(out, expected)] == [str(p) for p in expected]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# three inputs\n{photo[1].name}\n\n{photo_folder.name}/a/b\n")
    code, out, err = _classify(cli, tiny_checkpoint, listing)
    assert code == 0, err
    in_b = sorted((photo_folder / "a" / "b").iterdir())
    assert [r[0] for r in _rows(out, [photo[1], *in_b])] == [str(photo[1]), *map(str, in_b)]


def test_empty_folder_is_one_line(cli, tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    cli.error(
        "folder .*empty holds no image files",
        "classify",
        tmp_path / "empty",
        "--labels",
        "a,b",
        "--checkpoint",
        tiny_checkpoint,
    )


def test_labels_from_a_file(cli, photo, tiny_checkpoint, tmp_path):
    labels = tmp_path / "classes.txt"
    labels.write_text("sea lion\nhot air balloon\n\n")
    code, out, _ = cli("classify", photo[0], "--labels", labels, "--checkpoint", tiny_checkpoint, "--impl", "reference")
    assert code == 0
    assert re.search(r"astronaut\.png\s+(sea|hot)", out)


def test_out_writes_one_row_per_image_and_the_exit_summary(cli, photo_folder, tiny_teacher_checkpoint, tmp_path):
    out_csv = tmp_path / "results" / "predictions.csv"
    code, out, err = _classify(
        cli, tiny_teacher_checkpoint, photo_folder, "--out", out_csv, "--thresholds", "0.2,0.2", "--batch-size", "2"
    )
    assert code == 0, err
    rows = _read_csv(out_csv)
    assert len({r["exit_stage"] for r in rows}) >= 2, rows  # the gate sends these images to different exits
    assert [r["path"] for r in rows] == sorted(str(p) for p in photo_folder.rglob("*.*") if p.suffix != ".md")
    assert set(rows[0]) == {"path", "answer", "probability", "exit_stage", "gflops", "input_size"}
    costs = flops.exit_gflops(TINY)
    for r in rows:
        assert r["answer"] in ("cat", "dog", "car") and 0 < float(r["probability"]) <= 1
        assert float(r["gflops"]) == pytest.approx(costs[int(r["exit_stage"])], rel=1e-5)
        assert r["input_size"] == "32x32"
    summary = _read_csv(tmp_path / "results" / "predictions_exits.csv")
    assert [int(s["exit_stage"]) for s in summary] == [0, 1, 2]
    for s in summary:
        answered = [r for r in rows if int(r["exit_stage"]) == int(s["exit_stage"])]
        assert int(s["images"]) == len(answered)
        assert float(s["total_gflops"]) == pytest.approx(sum(float(r["gflops"]) for r in answered), rel=1e-5)
    printed = re.findall(r"^\s+(\d)\s+(\d+)\s+[\d.]+%", out, flags=re.MULTILINE)
    assert [(int(a), int(b)) for a, b in printed] == [(int(s["exit_stage"]), int(s["images"])) for s in summary]


def test_workers_give_the_same_rows(cli, photo_folder, tiny_checkpoint, tmp_path):
    for workers in ("0", "2"):
        code, _, err = _classify(
            cli, tiny_checkpoint, photo_folder, "--out", tmp_path / f"w{workers}.csv", "--workers", workers
        )
        assert code == 0, err
    assert (tmp_path / "w0.csv").read_text() == (tmp_path / "w2.csv").read_text()


def test_random_teacher_weights_are_seeded(cli, photo, tiny_teacher_checkpoint):
    def answers():
        code, out, err = cli("classify", *photo, "--labels", "cat,dog,car,cup", "--checkpoint",
                             tiny_teacher_checkpoint, "--impl", "reference", "--thresholds", "2,2")  # fmt: skip
        assert code == 0, err
        assert "RANDOM weights (seed 0)" in out
        return [(r[1], r[2]) for r in _rows(out, photo)]

    first = answers()
    torch.manual_seed(1234)  # whatever the process's random state, the random teacher is the same
    assert answers() == first


def test_bf16_precision_runs_and_says_so(cli, photo, tiny_checkpoint):
    code, out, err = _classify(cli, tiny_checkpoint, *photo, "--precision", "bf16")
    assert code == 0, err
    assert "precision: bf16 (weights and activations)" in out and "precision bf16;" in out
    assert len(_rows(out, photo)) == 2


def test_amp_precision_runs_and_says_so(cli, photo, tiny_checkpoint):
    code, out, err = _classify(cli, tiny_checkpoint, *photo, "--precision", "amp")
    assert code == 0, err
    assert "precision: amp (bf16 autocast, fp32 weights)" in out


def test_default_precision_is_amp_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision(None, "cuda") == "amp" and resolve_precision(None, "cuda:1") == "amp"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16" and resolve_precision("amp", "cpu") == "amp"


@pytest.mark.parametrize(
    ("picture", "size"),
    [((20, 20), (16, 16)), ((100, 40), (32, 32)), ((9, 50), (8, 8)), ((31, 64), (16, 16)), ((5, 5), (8, 8))],
)
def test_native_size_never_upsamples_when_a_dyadic_size_fits(picture, size):
    assert native_size(picture, (32, 32), 2) == size


def test_native_resolution_answers_with_the_stages_the_size_has(cli, tiny_checkpoint, tmp_path):
    import skimage.data

    from waveclip.images import preprocess
    from waveclip.zeroshot import ZeroShotClassifier

    path = tmp_path / "small.png"
    picture = Image.fromarray(skimage.data.chelsea()).resize((20, 18))
    picture.save(path)
    out_csv = tmp_path / "p.csv"
    code, _, err = _classify(cli, tiny_checkpoint, path, "--native-resolution", "--thresholds", "2,2", "--out", out_csv)
    assert code == 0, err
    (row,) = _read_csv(out_csv)
    assert row["input_size"] == "16x16" and int(row["exit_stage"]) == 1  # 16 px has stages 0-1; tau 2 passes none
    assert float(row["gflops"]) == pytest.approx(flops.exit_gflops(TINY, image_size=(16, 16))[1], rel=1e-5)
    model = WaveCLIP.from_pretrained(tiny_checkpoint, impl="reference")
    embeddings = torch.randn(3, TINY.embed_dim, generator=torch.Generator().manual_seed(0))
    (p,) = ZeroShotClassifier(model, embeddings, ["cat", "dog", "car"], thresholds=(2, 2)).predict(
        preprocess([Image.open(path).convert("RGB")], 16)
    )
    assert row["answer"] == p.name and float(row["probability"]) == pytest.approx(float(p.probs[p.label]), abs=1e-5)
    code, _, err = _classify(cli, tiny_checkpoint, path, "--thresholds", "2,2", "--out", out_csv)
    assert code == 0, err
    assert _read_csv(out_csv)[0]["input_size"] == "32x32"  # without the option the picture is upsampled


def test_list_file_errors_are_one_line(cli, photo, tiny_checkpoint, no_model_loading, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{photo[0].name}\nmissing.png\n")
    cli.error(r"no such image file or folder: .*missing\.png \(listed in .*inputs\.txt\)", "classify", listing,
              "--labels", "a,b", "--checkpoint", tiny_checkpoint)  # fmt: skip
    listing.write_text(f"{photo[0].name}\ninputs.txt\n")
    cli.error("list file .*inputs.txt lists itself", "classify", listing, "--labels", "a,b",
              "--checkpoint", tiny_checkpoint)  # fmt: skip
