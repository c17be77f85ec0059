"""Threshold calibration: the search finds the cheapest thresholds that meet the target, and the CLI writes
them into the checkpoint, with the CSV and PNG of the cost-metric curve."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from waveclip import WaveCLIP, WaveCLIPConfig, ZeroShotClassifier
from waveclip.flops import exit_gflops
from waveclip_cli.calibrate import add_arguments, run
from waveclip_train.calibrate import NEVER, calibrate, class_prototypes, exit_scores, gate_exits

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(margins, correct, cost, need):
    """Cheapest mean cost over every combination of observed margins (and never) as thresholds."""
    N, S = correct.shape
    best = None
    for taus in itertools.product(*[sorted(set(margins[:, s].tolist())) + [NEVER] for s in range(S - 1)]):
        stage = gate_exits(margins, taus)
        hits = int(correct[torch.arange(N), stage].sum())
        c = sum(cost[i] for i in stage.tolist()) / N
        if hits >= need and (best is None or c < best):
            best = c
    return best


def evaluate(margins, correct, cost, thresholds):
    stage = gate_exits(margins, thresholds)
    N = len(stage)
    return sum(cost[i] for i in stage.tolist()) / N, 100 * correct[torch.arange(N), stage].double().mean().item()


# Four samples, three exits of cost 1, 2 and 10, one disagreement allowed (75% agreement).
#   sample:           A    B    C    D
#   stage-0 margin:  0.9  0.8  0.1  0.1     stage-0 answer agrees with the last exit: no, yes, no, no
#   stage-1 margin:  0.9  0.9  0.8  0.7     stage-1 answer agrees:                     yes, yes, no, yes
# Stage by stage, a greedy search takes the lowest stage-0 threshold that still meets the target with
# everyone else at the last exit (tau_0 = 0.8: A and B leave, A wrong, cost 22); the error budget is then
# spent and no stage-1 threshold helps (C would leave wrong). The cheapest answer skips stage 0 and sends
# everyone out at stage 1 (tau_0 = never, tau_1 <= 0.7: cost 8, only C wrong).
KNOWN_MARGINS = torch.tensor([[0.9, 0.9, 0.5], [0.8, 0.9, 0.5], [0.1, 0.8, 0.5], [0.1, 0.7, 0.5]])
KNOWN_PREDS = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]])
KNOWN_COST = [1.0, 2.0, 10.0]


def test_known_answer_label_free():
    r = calibrate(KNOWN_PREDS, KNOWN_MARGINS, KNOWN_COST, labels=None, min_agreement=75.0)
    op = r.operating_point
    assert r.metric_name == "agreement" and r.exhaustive
    assert op.thresholds == pytest.approx((NEVER, 0.35))  # halfway between 0.7 and 0
    assert op.mean_gflops == pytest.approx(2.0) and op.metric == pytest.approx(75.0)
    assert op.exit_shares == pytest.approx((0.0, 1.0, 0.0))
    # What greedy would pick is feasible but costs far more.
    assert evaluate(KNOWN_MARGINS, KNOWN_PREDS == 0, KNOWN_COST, (0.8, NEVER)) == pytest.approx((5.5, 75.0))


def test_known_answer_with_labels():
    labels = torch.zeros(4, dtype=torch.int64)  # the last exit is right on every sample: 100%
    r = calibrate(KNOWN_PREDS, KNOWN_MARGINS, KNOWN_COST, labels=labels, max_drop=25.0)
    assert r.metric_name == "accuracy" and r.target == pytest.approx(75.0)
    assert r.operating_point.thresholds == pytest.approx((NEVER, 0.35))
    assert r.operating_point.mean_gflops == pytest.approx(2.0)
    # A tighter target (no drop) needs every sample right: only the last exit, or B leaving early.
    strict = calibrate(KNOWN_PREDS, KNOWN_MARGINS, KNOWN_COST, labels=labels, max_drop=0.0)
    assert strict.operating_point.metric == pytest.approx(100.0)
    assert strict.operating_point.mean_gflops == pytest.approx(
        brute_force(KNOWN_MARGINS, KNOWN_PREDS == 0, KNOWN_COST, 4)
    )


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("labelled", [False, True])
def test_matches_brute_force(stages, labelled):
    gen = torch.Generator().manual_seed(10 * stages + labelled)
    for _ in range(8):
        N = 9
        margins = torch.rand(N, stages, generator=gen).round(decimals=2)  # ties included
        preds = torch.randint(0, 3, (N, stages), generator=gen)
        labels = torch.randint(0, 3, (N,), generator=gen) if labelled else None
        cost = sorted(torch.rand(stages, generator=gen).mul(10).add(0.5).tolist())
        r = calibrate(preds, margins, cost, labels, max_drop=20.0, min_agreement=70.0)
        correct = preds == (labels.view(-1, 1) if labelled else preds[:, -1:])
        need = int(np.ceil(r.target * N / 100 - 1e-9))
        op = r.operating_point
        assert op.mean_gflops == pytest.approx(brute_force(margins, correct, cost, need))
        # The written thresholds reproduce the reported point, and it meets the target.
        assert evaluate(margins, correct, cost, op.thresholds) == pytest.approx((op.mean_gflops, op.metric))
        assert op.metric >= r.target - 1e-9
        # The frontier is increasing in both cost and metric, and every point is reproducible.
        for a, b in itertools.pairwise(r.frontier):
            assert a.mean_gflops <= b.mean_gflops and a.metric < b.metric
        for p in r.frontier:
            assert evaluate(margins, correct, cost, p.thresholds) == pytest.approx((p.mean_gflops, p.metric))
        assert [p.mean_gflops for p in r.single_exits] == pytest.approx(cost)


def test_candidate_grid_when_margins_are_many():
    gen = torch.Generator().manual_seed(3)
    N, S = 400, 3
    margins = torch.rand(N, S, generator=gen)
    preds = torch.where(margins > 0.3, 0, torch.randint(0, 4, (N, S), generator=gen))  # confident = agrees
    preds[:, -1] = 0
    cost = [1.0, 2.0, 4.0]
    r = calibrate(preds, margins, cost, None, min_agreement=95.0, max_candidates=8)
    assert not r.exhaustive
    op = r.operating_point
    assert op.metric >= 95.0 and op.mean_gflops < cost[-1]
    assert evaluate(margins, preds == 0, cost, op.thresholds) == pytest.approx((op.mean_gflops, op.metric))
    exact = calibrate(preds, margins, cost, None, min_agreement=95.0, max_candidates=N)
    assert exact.exhaustive and exact.operating_point.mean_gflops <= op.mean_gflops


def test_exit_scores_match_the_gate():
    z = torch.nn.functional.normalize(torch.randn(6, 3, 16), dim=-1)
    classes = torch.randn(4, 16)
    preds, margins = exit_scores(z, classes, logit_scale=30.0)
    model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference")
    clf = ZeroShotClassifier(model, classes, logit_scale=30.0)
    for s in range(3):
        probs = clf.probabilities(z[:, s])
        assert torch.equal(preds[:, s], probs.argmax(-1))
        torch.testing.assert_close(margins[:, s], clf.margin(probs))
    with pytest.raises(ValueError, match="at least 2 class"):
        exit_scores(z, classes[:1], 100.0)


def test_bad_targets():
    preds, margins = KNOWN_PREDS, KNOWN_MARGINS
    with pytest.raises(ValueError, match="no thresholds reach"):
        calibrate(preds, margins, KNOWN_COST, None, min_agreement=101.0)
    with pytest.raises(ValueError, match="exit costs"):
        calibrate(preds, margins, KNOWN_COST[:2], None)


def _image_folders(root, per_class=4, size=32):
    gen = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = gen.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 255 - 8 * i  # a class-specific colour cast
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_cli_writes_thresholds_csv_and_png(tmp_path):
    ckpt, data, out = tmp_path / "student", tmp_path / "images", tmp_path / "out"
    model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference")
    model.save_pretrained(ckpt)
    _image_folders(data)
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(ckpt), "--data", str(data), "--labels-from-folders", "--prototypes-from", str(data)]
        + ["--max-drop", "10", "--out", str(out), "--impl", "reference", "--save-embeddings", str(tmp_path / "e.pt")]
    )
    assert run(args) == 0
    config = json.loads((ckpt / "config.json").read_text())
    with open(out / "calibration.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("operating_point") == 1 and {"exit_0", "exit_1", "exit_2"} <= set(kinds)
    assert "frontier" in kinds
    assert (out / "calibration.png").stat().st_size > 1000
    op = next(r for r in rows if r["kind"] == "operating_point")
    assert config["thresholds"] == pytest.approx([float(op["tau_0"]), float(op["tau_1"])], rel=1e-5)
    singles = [float(next(r for r in rows if r["kind"] == f"exit_{s}")["mean_gflops"]) for s in range(3)]
    assert singles == pytest.approx(exit_gflops(WaveCLIPConfig.from_dict(config)), rel=1e-5)

    # The adaptive classifier with the written thresholds behaves as the calibration reported.
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    student = WaveCLIP.from_pretrained(ckpt, impl="reference")
    clf = ZeroShotClassifier(student, saved["class_embeddings"], logit_scale=100.0)
    from waveclip_train.data import build_dataset

    ds = build_dataset([data], student.config.image_size, labels_from_folders=True)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    answers = clf.predict(images)
    accuracy = 100 * np.mean([a.label == y for a, y in zip(answers, ds.labels.tolist())])
    shares = np.bincount([a.exit_stage for a in answers], minlength=3) / len(answers)
    assert accuracy == pytest.approx(float(op["accuracy"]), abs=1e-3)
    assert shares == pytest.approx([float(op[f"share_exit_{s}"]) for s in range(3)], abs=1e-3)
    assert np.mean([a.gflops for a in answers]) == pytest.approx(float(op["mean_gflops"]), rel=1e-5)

    # Calibrating again from the saved embeddings gives the same operating point.
    args = parser.parse_args(
        ["--checkpoint", str(ckpt), "--embeddings", str(tmp_path / "e.pt"), "--max-drop", "10", "--dry-run"]
        + ["--out", str(tmp_path / "again")]
    )
    assert run(args) == 0
    with open(tmp_path / "again" / "calibration.csv") as f:
        again = next(r for r in csv.DictReader(f) if r["kind"] == "operating_point")
    assert again == op


def test_cli_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "student"
    WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").save_pretrained(ckpt)
    (tmp_path / "empty").mkdir()
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(ckpt), "--data", str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "holds no image" in err
    assert not (tmp_path / "calibration.csv").exists()


def test_class_prototypes():
    z = torch.randn(6, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    p = class_prototypes(z, labels, 3)
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(z, dim=-1)[:2].sum(0), dim=0)
    torch.testing.assert_close(p[0], expected)
    with pytest.raises(ValueError, match="no prototype images"):
        class_prototypes(z, labels, 4)


def test_cli_class_names_through_the_teacher_text_tower(tmp_path, capsys):
    teacher_json = tmp_path / "tiny-calib-teacher.json"
    teacher_json.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    from waveclip_train.teacher import load_teacher_model

    teacher, _ = load_teacher_model(str(teacher_json), None)
    student = WaveCLIP.from_open_clip(teacher, WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference")
    student.save_pretrained(tmp_path / "student")
    _image_folders(tmp_path / "images")
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(tmp_path / "student"), "--data", str(tmp_path / "images"), "--labels-from-folders"]
        + ["--class-names", "cat,dog", "--teacher", str(teacher_json), "--out", str(tmp_path), "--impl", "reference"]
    )
    assert run(args) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    assert (tmp_path / "calibration.csv").is_file()


# ------------------------------------------------------------------------------------ options up front


def _student_and_folders(tmp_path):
    ckpt, data = tmp_path / "student", tmp_path / "images"
    WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").save_pretrained(ckpt)
    _image_folders(data)
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    return ckpt, data, parser


def _count_computes(monkeypatch):
    import waveclip_train.calibrate as calibration

    calls = []
    compute = calibration.compute_embeddings
    monkeypatch.setattr(calibration, "compute_embeddings", lambda *a, **k: calls.append(1) or compute(*a, **k))
    return calls


def test_max_drop_and_min_agreement_are_one_or_the_other(tmp_path, capsys):
    ckpt, data, parser = _student_and_folders(tmp_path)
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--labels-from-folders", "--prototypes-from", str(data)]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*argv, "--max-drop", "2", "--min-agreement", "90"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    # With labels, --min-agreement asks for agreement with the last exit: the labels are not used.
    args = parser.parse_args([*argv, "--min-agreement", "90", "--out", str(tmp_path / "a"), "--dry-run"])
    assert run(args) == 0
    with open(tmp_path / "a" / "calibration.csv") as f:
        assert "agreement" in next(csv.reader(f))


def test_max_drop_without_labels_stops_before_the_compute(tmp_path, capsys, monkeypatch):
    ckpt, data, parser = _student_and_folders(tmp_path)
    calls = _count_computes(monkeypatch)
    args = parser.parse_args(["--checkpoint", str(ckpt), "--data", str(data), "--max-drop", "1"])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no labels" in err and not calls


def test_save_embeddings_folder_is_made_or_refused_before_the_compute(tmp_path, capsys, monkeypatch):
    ckpt, data, parser = _student_and_folders(tmp_path)
    calls = _count_computes(monkeypatch)
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--labels-from-folders", "--prototypes-from", str(data)]
    argv += ["--out", str(tmp_path / "out"), "--dry-run"]
    target = tmp_path / "new" / "folder" / "e.pt"
    assert run(parser.parse_args([*argv, "--save-embeddings", str(target)])) == 0
    assert torch.load(target, weights_only=True)["embeddings"].shape[:2] == (8, 3)
    (tmp_path / "a_file").write_text("in the way")
    calls.clear()
    assert run(parser.parse_args([*argv, "--save-embeddings", str(tmp_path / "a_file" / "e.pt")])) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "save_embeddings" in err and not calls
