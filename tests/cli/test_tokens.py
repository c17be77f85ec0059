"""Progressive input: `waveclip tokenize --save` writes stage tokens, `waveclip classify` reads them."""

import csv

import pytest
import torch
from safetensors.torch import save_file

import waveclip_kernels as wk
from waveclip.images import load_image, preprocess
from waveclip_cli.tokenfile import StageTokens, load_tokens, save_tokens


def _tokenize(cli, image, path, size=32, levels=2, grid=2):
    code, out, err = cli("tokenize", image, "--save", path, "--size", size, "--levels", levels, "--grid", grid)
    assert code == 0, err
    return out


def test_tokenize_save_writes_the_stage_tokens_and_their_geometry(cli, photo, tmp_path):
    path = tmp_path / "tokens" / "astronaut.safetensors"
    out = _tokenize(cli, photo[0], path, size=64, levels=2, grid=4)
    assert f"saved tokens {path}" in out
    saved = load_tokens(path)
    assert (saved.levels, saved.grid, saved.color, saved.image_size) == (2, (4, 4), "ycbcr", (64, 64))
    assert saved.source == str(photo[0])
    x = preprocess([load_image(photo[0])], 64)
    expected = wk.wavelet_tokenize(x.double(), 2, 4, "ycbcr", impl="reference")
    assert [tuple(t.shape) for t in saved.tokens] == [(16, 48), (16, 144), (16, 576)]
    for t, e in zip(saved.tokens, expected):
        torch.testing.assert_close(t.double(), e[0], rtol=0, atol=1e-5)


def test_token_file_round_trip_keeps_fewer_stages(tmp_path):
    tokens = [torch.randn(4, 48), torch.randn(4, 144)]  # stages 0-1 of an L=2, 2x2-grid tokenization at 32 px
    path = save_tokens(tmp_path / "t.safetensors", StageTokens(tokens, 2, (2, 2), "rgb", (32, 32), "x.png"))
    loaded = load_tokens(path)
    assert (loaded.levels, loaded.grid, loaded.color, loaded.image_size, loaded.source) == (
        2,
        (2, 2),
        "rgb",
        (32, 32),
        "x.png",
    )
    assert all(torch.equal(a, b) for a, b in zip(loaded.tokens, tokens)) and len(loaded.tokens) == 2


def test_files_that_are_not_token_files_are_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match=r"model\.safetensors is not a waveclip token file"):
        load_tokens(tiny_checkpoint / "model.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"cannot read token file .*garbage\.safetensors"):
        load_tokens(garbage)
    wrong = tmp_path / "wrong.safetensors"
    metadata = {"format": "waveclip-tokens", "version": "1", "levels": "2", "grid": "2,2", "color": "ycbcr",
                "image_size": "32,32"}  # fmt: skip
    save_file({"stage_0": torch.zeros(4, 47)}, str(wrong), metadata=metadata)
    with pytest.raises(ValueError, match=r"stage_0 has shape \(4, 47\), expected \(4, 48\)"):
        load_tokens(wrong)
    save_file({"stage_1": torch.zeros(4, 144)}, str(wrong), metadata=metadata)
    with pytest.raises(ValueError, match="must hold stage_0"):
        load_tokens(wrong)


def test_token_file_that_does_not_fit_the_tower_is_one_line(cli, photo, tiny_checkpoint, tmp_path):
    path = tmp_path / "grid4.safetensors"
    _tokenize(cli, photo[0], path, size=32, levels=2, grid=1)  # the tiny tower's grid is 2x2
    cli.error(
        "token file .*grid4.safetensors .*does not fit this tower", "classify", path, "--labels", "a,b",
        "--checkpoint", tiny_checkpoint, "--impl", "reference",
    )  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _classify(cli, checkpoint, out, *inputs, thresholds="2,2"):
    code, _, err = cli("classify", *inputs, "--labels", "cat,dog,car", "--checkpoint", checkpoint, "--impl",
                       "reference", "--thresholds", thresholds, "--out", out)  # fmt: skip
    assert code == 0, err
    return _rows(out)


@pytest.mark.parametrize("thresholds", ["2,2", "0,0", "0.2,0.2"])
def test_classify_from_tokens_answers_as_from_the_image(cli, photo, tiny_teacher_checkpoint, tmp_path, thresholds):
    tokens = tmp_path / "astronaut.safetensors"
    _tokenize(cli, photo[0], tokens)
    from_image, from_tokens = _classify(cli, tiny_teacher_checkpoint, tmp_path / "p.csv", photo[0], tokens,
                                        thresholds=thresholds)  # fmt: skip
    assert from_tokens["path"] == str(tokens)
    for key in ("answer", "exit_stage", "input_size"):
        assert from_tokens[key] == from_image[key]
    assert float(from_tokens["probability"]) == pytest.approx(float(from_image["probability"]), abs=1e-5)


def test_classify_from_leading_stages_answers_at_the_last_one_given(cli, photo, tiny_checkpoint, tmp_path):
    full = tmp_path / "full.safetensors"
    _tokenize(cli, photo[0], full)
    saved = load_tokens(full)
    partial = save_tokens(tmp_path / "partial.safetensors", StageTokens(saved.tokens[:2], 2, (2, 2), "ycbcr", (32, 32)))
    (row,) = _classify(cli, tiny_checkpoint, tmp_path / "p.csv", partial)
    assert row["exit_stage"] == "1"  # tau 2 lets no stage answer early: the last stage in the file does


def test_tokens_of_a_smaller_image_answer_as_that_image(cli, photo, tiny_checkpoint, tmp_path):
    tokens = tmp_path / "small.safetensors"
    _tokenize(cli, photo[0], tokens, size=16, levels=1)  # 32 / 2: the tiny tower's first two stages
    small = tmp_path / "small.png"
    load_image(photo[0]).resize((16, 16)).save(small)
    from_tokens, from_image = _classify(cli, tiny_checkpoint, tmp_path / "p.csv", tokens, small)
    assert from_tokens["input_size"] == "16x16" and from_tokens["exit_stage"] == "1"
    image_row = _classify(cli, tiny_checkpoint, tmp_path / "q.csv", small, "--native-resolution")[0]
    assert from_tokens["answer"] == image_row["answer"] and from_tokens["exit_stage"] == image_row["exit_stage"]
    assert float(from_tokens["probability"]) == pytest.approx(float(image_row["probability"]), abs=1e-4)
    assert from_image["input_size"] == "32x32"
