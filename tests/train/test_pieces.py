"""The pieces of the training package, one at a time: options, step planning, one optimizer step,
checkpoints, and the package's import rules."""

import ast
import contextlib
import functools
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from waveclip_train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resume_path,
    save_checkpoint,
)
from waveclip_train.data import DataError
from waveclip_train.distill import StepParts, autocast_for, plan_steps, resolve_precision, train_step
from waveclip_train.distributed import Dist
from waveclip_train.loss import distill_loss
from waveclip_train.optim import build_optimizer, lr_factor
from waveclip_train.options import CalibrateOptions, DistillOptions

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "waveclip_train"


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("accum_steps", 0),
        ("epochs", 0),
        ("steps", -1),
        ("lr", -1.0),
        ("lr_new", float("nan")),
        ("min_lr_ratio", 1.5),
        ("kl_temperature", 0.0),
        ("precision", "fp8"),
        ("impl", "gpu"),
        ("split", "test"),
        ("holdout_fraction", 2.0),
        ("exit_weights", [1.0, 1.0]),
        ("class_names", ["cat", "cat"]),
        ("eval_images", 0),
        ("preset", "no-such-preset"),
    ],
)
def test_distill_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistillOptions(**(dict(data=["images"], out="out", preset="waveclip-tiny") | {field: value}))


def test_distill_options_accept_the_defaults_and_count_exits_from_levels():
    assert DistillOptions(data=["images"], out="out").batch_size == 32
    DistillOptions(data=["images"], out="out", preset="waveclip-tiny", levels=1, exit_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="exit_weights needs 3"):
        DistillOptions(data=["images"], out="out", preset="waveclip-tiny", exit_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="data"):
        DistillOptions(data=[], out="out")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(data=["d"], embeddings="e.pt"), "exactly one of data"),
        (dict(), "exactly one of data"),
        (dict(embeddings="e.pt", save_embeddings="f.pt"), "save_embeddings"),
        (dict(data=["d"], max_drop=1.0, min_agreement=99.0), "not both"),
        (dict(data=["d"], max_drop=1.0, no_labels=True), "needs labels"),
        (dict(data=["d"], class_names=["a", "b"], prototypes_from=["p"]), "at most one of"),
        (dict(data=["d"], min_agreement=101.0), "min_agreement"),
        (dict(data=["d"], max_drop=-1.0), "max_drop"),
        (dict(data=["d"], batch_size=0), "batch_size"),
    ],
)
def test_calibrate_options_refuse_what_does_not_fit(fields, message):
    with pytest.raises(ValueError, match=message):
        CalibrateOptions(checkpoint="ckpt", **fields)


# ---------------------------------------------------------------------------------------- planning


def test_plan_steps():
    assert plan_steps(10, 1, 2, 2, 3, None) == (2, 6)  # 5 micro-batches -> 2 full steps per epoch
    assert plan_steps(10, 2, 2, 1, 1, 7) == (2, 7)  # 5 images per process -> 2 batches; steps override epochs
    with pytest.raises(DataError, match="do not fill one optimizer step"):
        plan_steps(3, 2, 2, 1, 1, None)


def test_precision_defaults_to_bf16_on_cuda_only():
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


# -------------------------------------------------------------------------------------------- step


def _parts(student, total_steps=10, warmup=2, autocast=contextlib.nullcontext, max_grad_norm=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(64, student.config.embed_dim, generator=gen), dim=-1)
    optimizer, scheduler = build_optimizer(student, 1e-3, 3e-3, 0.0, total_steps, warmup, 0.0)
    loss = functools.partial(distill_loss, weights=torch.ones(student.config.num_stages))
    return StepParts(
        student, student, optimizer, scheduler, None, lambda images, index: table[index], loss, autocast,
        max_grad_norm, Dist(),
    )  # fmt: skip


def _batch(n, start=0):
    return torch.randn(n, 3, 32, 32), torch.arange(start, start + n)


def test_step_records_the_learning_rate_it_applied(tiny_tower):
    student = tiny_tower().train()
    parts = _parts(student, total_steps=10, warmup=4)
    before = student.level_embedding.detach().clone()  # a "new_no_decay" parameter: lr_new, no decay
    record = train_step(parts, [_batch(4)], step=0, epoch=0)
    assert record.step == 1 and record.epoch == 0
    assert record.lrs["new"] == pytest.approx(3e-3 * lr_factor(0, 10, 4, 0.0))
    assert record.lrs["trunk"] == pytest.approx(1e-3 * lr_factor(0, 10, 4, 0.0))
    # Adam's first update moves every parameter with a clear gradient by lr: the lr the record names.
    moved = (student.level_embedding.detach() - before).abs().max().item()
    assert moved == pytest.approx(record.lrs["new_no_decay"], rel=1e-3)
    second = train_step(parts, [_batch(4, 4)], step=1, epoch=0)
    assert second.lrs["new"] == pytest.approx(3e-3 * lr_factor(1, 10, 4, 0.0))
    assert len(record.cos_loss) == 3 and record.kl is None and record.loss == pytest.approx(sum(record.cos_loss))


def test_accumulated_micro_batches_step_like_one_batch(tiny_tower):
    images, index = _batch(4)
    a, b = tiny_tower().train(), tiny_tower().train()
    b.load_state_dict(a.state_dict())
    one = train_step(_parts(a, max_grad_norm=1.0), [(images, index)], 0, 0)
    two = train_step(_parts(b, max_grad_norm=1.0), [(images[:2], index[:2]), (images[2:], index[2:])], 0, 0)
    assert one.loss == pytest.approx(two.loss, rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


class _OpDtypes(TorchDispatchMode):
    """Records the dtypes of the tensors each waveclip op receives (below autocast and autograd)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "waveclip":
            self.seen.append((func.__name__.split(".")[0], [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_feeds_bf16_to_the_attention_op(tiny_tower):
    student = tiny_tower(impl="auto").train()  # distill's default impl
    parts = _parts(student, autocast=autocast_for(torch.device("cpu"), torch.bfloat16))
    with _OpDtypes() as ops:
        record = train_step(parts, [_batch(2)], 0, 0)
    attention = [dtypes for name, dtypes in ops.seen if name == "block_causal_attention"]
    assert len(attention) == student.config.layers
    assert all(dtypes == [torch.bfloat16] * 3 for dtypes in attention), attention
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights
    assert all(torch.isfinite(torch.tensor(v)) for v in record.cos_loss)


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_latest_and_prune(tmp_path, tiny_tower):
    student = tiny_tower().train()
    parts = _parts(student)
    train_step(parts, [_batch(2)], 0, 0)
    key = {"seed": 0, "world": 1}
    for step in (1, 2, 3):
        path = checkpoint_path(tmp_path, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, student, parts.optimizer, parts.scheduler, None, step, key, Dist())
    draw_after_save = torch.rand(3)
    (tmp_path / "checkpoints" / "step-00000009.tmp").mkdir()  # an interrupted write is never "latest"
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 3)
    assert resume_path("auto", tmp_path) == checkpoint_path(tmp_path, 3)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000003", "step-00000009.tmp",
    ]  # fmt: skip

    fresh = tiny_tower().train()
    other = _parts(fresh)
    torch.manual_seed(123)
    step = load_checkpoint(checkpoint_path(tmp_path, 3), fresh, other.optimizer, other.scheduler, None, key, Dist())
    assert step == 3
    for p, q in zip(student.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    saved, loaded = parts.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == len(list(student.parameters()))
    for i in saved:
        assert all(torch.equal(torch.as_tensor(saved[i][k]), torch.as_tensor(loaded[i][k])) for k in saved[i])
    assert other.scheduler.last_epoch == parts.scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), draw_after_save)  # the generators continue from the save
    with pytest.raises(ValueError, match=r"cannot resume exactly.*seed"):
        load_checkpoint(
            checkpoint_path(tmp_path, 3), fresh, other.optimizer, other.scheduler, None, {"seed": 1}, Dist()
        )
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resume_path(str(tmp_path), tmp_path)
    assert resume_path("auto", tmp_path / "elsewhere") is None and resume_path(None, tmp_path) is None


# ------------------------------------------------------------------------------------- import rules


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_package_parses_no_command_line_and_calibration_stands_alone():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 10
    for path in modules:
        imports = _imports(path)
        assert "argparse" not in imports, path.name
        assert not any(name.startswith("waveclip_cli") for name in imports), path.name
    assert not {".distill", ".train_log", ".checkpoint"} & _imports(PACKAGE / "calibrate.py")
