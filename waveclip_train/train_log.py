"""`train_log.csv`: one row per optimizer step (the learning rates that step used, the loss, 1 - cos and
KL per exit), and its plot."""

from __future__ import annotations

import csv
import dataclasses
import pathlib

from torch import Tensor


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step did."""

    step: int  # optimizer steps done, this one included (1 for the first)
    epoch: int
    lrs: dict[str, float]  # learning rate per parameter group name, as this step applied it
    loss: float  # total loss, mean over micro-batches and processes
    cos_loss: list[float]  # 1 - cos per exit
    kl: list[float] | None  # KL per exit, when the KL term runs


def log_header(num_exits: int, with_kl: bool) -> list[str]:
    return (
        ["step", "epoch", "lr_new", "lr_trunk", "loss"]
        + [f"cos_loss_{s}" for s in range(num_exits)]
        + ([f"kl_{s}" for s in range(num_exits)] if with_kl else [])
    )


def start_log(path: pathlib.Path, num_exits: int, with_kl: bool, start_step: int) -> None:
    """A fresh log, or on resume the old one cut back to the resumed step."""
    rows = []
    if start_step and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if int(r[0]) <= start_step]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(log_header(num_exits, with_kl))
        w.writerows(rows)


def log_row(record: StepRecord) -> list[str]:
    nan = float("nan")
    row = [str(record.step), str(record.epoch)]
    row += [f"{record.lrs.get('new', nan):.6g}", f"{record.lrs.get('trunk', nan):.6g}", f"{record.loss:.9g}"]
    return row + [f"{v:.9g}" for v in record.cos_loss + (record.kl or [])]


def append_log(path: pathlib.Path, record: StepRecord) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(log_row(record))


def losses_of(sums: Tensor, num_exits: int, with_kl: bool) -> tuple[float, list[float], list[float] | None]:
    """Split the (1 + 2S,) step sums [loss, 1 - cos per exit, KL per exit] into the record's fields."""
    values = sums.tolist()
    return values[0], values[1 : 1 + num_exits], values[1 + num_exits :] if with_kl else None


def plot_log(log_csv: pathlib.Path, png: pathlib.Path) -> None:
    """1 - cos per exit against the step, from train_log.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k in (k for k in rows[0] if k.startswith("cos_loss_")):
        ax.plot(steps, [float(r[k]) for r in rows], lw=1.2, label=f"exit {k.removeprefix('cos_loss_')}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("1 - cos(student, teacher), batch mean")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
