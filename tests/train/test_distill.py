"""Distillation: the loss goes down, resume is exact, the teacher cache is keyed right, bad data stops clearly."""

import argparse
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from waveclip import WaveCLIPConfig
from waveclip_cli.distill import add_arguments, run
from waveclip_train.data import DataError, ImageDataset, build_dataset, list_images, split_of
from waveclip_train.distill import distill
from waveclip_train.distributed import Dist
from waveclip_train.loss import distill_loss
from waveclip_train.optim import lr_factor, param_groups
from waveclip_train.options import DistillOptions
from waveclip_train.teacher import cached_teacher_embeddings, load_teacher_model, teacher_embed

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_TEACHER = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_teacher_config(tmp_path):
    path = tmp_path / "tiny-vit-teacher.json"
    path.write_text(json.dumps(TINY_TEACHER))
    return str(path)


def write_images(folder, n, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(gen.integers(0, 256, (size, size + 3 * (i % 3), 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    return folder


def options(tmp_path, data, out, **kw):
    base = dict(
        data=[str(data)],
        out=str(out),
        teacher=tiny_teacher_config(tmp_path),
        preset="waveclip-tiny",
        batch_size=2,
        accum_steps=2,
        lr=1e-3,
        lr_new=3e-3,
        warmup_steps=2,
        device="cpu",
        impl="reference",
        num_workers=0,
        eval_images=4,
        progress=False,
    )
    return DistillOptions(**(base | kw))


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    teacher, _ = load_teacher_model(tiny_teacher_config(tmp_path), None)
    from waveclip import WaveCLIP

    student = WaveCLIP.from_open_clip(teacher, WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference")
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        target = teacher_embed(teacher, images)
    classes = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    optimizer = torch.optim.AdamW(param_groups(student, 1e-3, 1e-2, 0.0))
    weights = torch.ones(3)
    history = []
    for _ in range(25):
        loss, cos_loss, kl = distill_loss(student(images), target, weights, classes, 14.3, 1.0, 2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), cos_loss, kl))
    first, last = history[0], history[-1]
    assert last[0] < 0.5 * first[0]
    assert (last[1] < first[1]).all() and (last[2] <= first[2] + 1e-6).all()


def test_loss_terms():
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    z = t[:, None].expand(4, 3, 8)
    classes = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    loss, cos_loss, kl = distill_loss(z, t, torch.ones(3), classes)
    assert cos_loss.abs().max() < 1e-6 and kl.abs().max() < 1e-6 and loss.abs() < 1e-5
    loss, cos_loss, _ = distill_loss(-z, t, torch.tensor([1.0, 0.0, 2.0]))
    torch.testing.assert_close(cos_loss, torch.full((3,), 2.0))
    torch.testing.assert_close(loss, torch.tensor(6.0))


def test_param_groups_and_schedule(tmp_path):
    from waveclip import WaveCLIP

    model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference")
    groups = param_groups(model, 1e-5, 1e-3, 0.1)
    named = {id(p): n for n, p in model.named_parameters()}
    seen = [named[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(named.values())  # every parameter exactly once
    for g in groups:
        names = [named[id(p)] for p in g["params"]]
        new = g["name"].startswith("new")
        assert g["lr"] == (1e-3 if new else 1e-5)
        assert all(
            n.startswith(("stage_proj", "class_embedding", "positional_embedding", "level_embedding")) == new
            for n in names
        )
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.1)
    assert "stage_proj.0.weight" in [named[id(p)] for g in groups if g["name"] == "new" for p in g["params"]]
    assert [lr_factor(s, 10, 2, 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, 0.1) == pytest.approx(1.0) and lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, 0.0) == pytest.approx(0.5)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = write_images(tmp_path / "images", 10)  # 5 micro-batches of 2: 2 steps per epoch
    full = distill(options(tmp_path, data, tmp_path / "full", steps=5, save_every=3, keep_checkpoints=0))
    assert full.steps == 5
    assert full.before["cosine"] != full.after["cosine"]
    resumed = distill(
        options(tmp_path, data, tmp_path / "resumed", steps=5, resume=str(tmp_path / "full/checkpoints/step-00000003"))
    )
    assert resumed.steps == 5 and resumed.before is None
    a, b = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    a = load_file(tmp_path / "full/checkpoints/step-00000005/trainer.safetensors")
    b = load_file(tmp_path / "resumed/checkpoints/step-00000005/trainer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(name):
        with open(tmp_path / name / "train_log.csv") as f:
            return list(csv.reader(f))

    assert log("full")[4:] == log("resumed")[1:]  # steps 4 and 5, identical to 9 digits
    # A run that differs (here the batch) refuses to resume from it.
    with pytest.raises(ValueError, match="cannot resume exactly"):
        distill(
            options(
                tmp_path,
                data,
                tmp_path / "other",
                steps=5,
                batch_size=1,
                resume=str(tmp_path / "full/checkpoints/step-00000003"),
            )
        )


def test_teacher_cache_keys(tmp_path):
    data = write_images(tmp_path / "images", 5)
    ds = build_dataset([data], 32)
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return torch.stack([torch.full((4,), float(i)) for i in idx])

    emb, fresh = cached_teacher_embeddings(str(tmp_path / "cache"), "teacherA", ds, compute, Dist())
    assert fresh == 5 and calls == [[0, 1, 2, 3, 4]]
    emb2, fresh = cached_teacher_embeddings(str(tmp_path / "cache"), "teacherA", ds, compute, Dist())
    assert fresh == 0 and torch.equal(emb, emb2) and len(calls) == 1
    st = os.stat(data / "002.png")
    os.utime(data / "002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    _, fresh = cached_teacher_embeddings(str(tmp_path / "cache"), "teacherA", ds, compute, Dist())
    assert fresh == 1 and calls[-1] == [2]
    _, fresh = cached_teacher_embeddings(str(tmp_path / "cache"), "teacherB", ds, compute, Dist())
    assert fresh == 5  # another teacher: nothing reused
    # A subset in another order reads the right rows.
    sub = ImageDataset(ds.records[::-1][:3], 32)
    emb3, fresh = cached_teacher_embeddings(str(tmp_path / "cache"), "teacherA", sub, compute, Dist())
    assert fresh == 0 and torch.equal(emb3, emb[[4, 3, 2]])


@pytest.mark.slow
def test_cached_teacher_run_matches_online_run(tmp_path):
    data = write_images(tmp_path / "images", 8)
    kw = dict(steps=2, batch_size=4, accum_steps=1, class_names=["cat", "dog", "ship"], kl_weight=0.5)
    online = distill(options(tmp_path, data, tmp_path / "online", **kw))
    cached = distill(options(tmp_path, data, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"), **kw))
    a, b = online.model.state_dict(), cached.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("teacher-*.safetensors"))) == 1
    with open(tmp_path / "cached" / "train_log.csv") as f:
        header = next(csv.reader(f))
    assert header[-3:] == ["kl_0", "kl_1", "kl_2"]  # the KL term ran
    assert (tmp_path / "cached" / "train_log.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ bad data


def test_empty_folder_stops_with_one_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no image"):
        list_images(tmp_path / "empty")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--teacher", tiny_teacher_config(tmp_path), "--preset", "waveclip-tiny", "--data", str(tmp_path / "empty")]
        + ["--out", str(tmp_path / "out"), "--impl", "reference", "--no-progress"]
    )
    assert run(args) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "holds no image" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_unreadable_images_stop_by_default_and_skip_when_asked(tmp_path):
    data = write_images(tmp_path / "images", 4)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (data / "truncated.png").write_bytes((data / "000.png").read_bytes()[:200])
    with pytest.raises(DataError) as err:
        build_dataset([data], 32)
    msg = str(err.value)
    assert "2 of 6 images" in msg and "broken.jpg" in msg and "truncated.png" in msg and "--skip-unreadable" in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset([data], 32, skip_unreadable=True)
    assert len(ds) == 4 and len(caught) == 1 and "skipping 2 unreadable" in str(caught[0].message)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 images"):
        build_dataset([only_bad], 32, skip_unreadable=True)


def test_list_files_labels_and_splits(tmp_path):
    data = write_images(tmp_path / "images", 3)
    listing = tmp_path / "list.txt"
    listing.write_text("# a list\nimages/000.png\tcat\n\nimages/001.png\tdog\nimages/002.png\tcat\n")
    ds = build_dataset([listing], 32)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 0]
    image, index = ds[1]
    assert image.shape == (3, 32, 32) and index == 1
    listing.write_text("images/000.png\nimages/missing.png\n")
    with pytest.raises(DataError, match=r"1 listed file.*missing\.png"):
        list_images(listing)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    write_images(tmp_path / "classes" / "a", 2)
    (data / "000.png").rename(tmp_path / "classes" / "loose.png")
    with pytest.raises(DataError, match=r"loose\.png lies directly"):
        list_images(tmp_path / "classes", labels_from_folders=True)
    names = [r.name for r in list_images("builtin:textiles")]
    held = [n for n in names if split_of(n, 0.2) == "holdout"]
    assert len(names) == 2000 and 300 < len(held) < 500  # about a fifth, fixed by the file names


# ------------------------------------------------------------------------------------ what is written


def test_train_log_gives_the_learning_rate_each_step_used(tmp_path):
    data = write_images(tmp_path / "images", 8)
    distill(options(tmp_path, data, tmp_path / "out", steps=4, warmup_steps=2, min_lr_ratio=0.1))
    with open(tmp_path / "out" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        factor = lr_factor(int(r["step"]) - 1, 4, 2, 0.1)  # logged step k ran with the schedule's step k - 1
        assert float(r["lr_new"]) == pytest.approx(3e-3 * factor, rel=1e-5)
        assert float(r["lr_trunk"]) == pytest.approx(1e-3 * factor, rel=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_a_run_honours_the_umask(tmp_path, umask):
    data = write_images(tmp_path / "images", 4)
    old = os.umask(umask)
    try:
        distill(options(tmp_path, data, tmp_path / "out", steps=1, teacher_cache=str(tmp_path / "cache")))
    finally:
        os.umask(old)
    files = [p for folder in ("out", "cache") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "trainer.safetensors", "rng-0.safetensors", "train_log.csv"} <= names
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_zero_steps_write_the_initial_student(tmp_path):
    from waveclip import WaveCLIP

    data = write_images(tmp_path / "images", 4)
    result = distill(options(tmp_path, data, tmp_path / "init", steps=0))
    assert result.steps == 0 and result.before == result.after
    torch.manual_seed(0)  # the run's seed: the same random teacher
    teacher, _ = load_teacher_model(tiny_teacher_config(tmp_path), None)
    initial = WaveCLIP.from_open_clip(teacher, result.model.config, impl="reference").state_dict()
    written = load_file(tmp_path / "init" / "model.safetensors")
    assert written.keys() == initial.keys() and all(torch.equal(written[k], initial[k]) for k in initial)
