"""Zero-shot classification with early exit: every input starts at the coarsest stage and refines (reusing
cached keys/values) until the margin gate lets it answer. Inputs are image files, folders (walked
recursively), .txt lists of inputs, and .safetensors token files from `waveclip tokenize --save` (classified
stage by stage from their tokens). Prints the label, its probability, the exit stage and the GFLOPs spent
per input, and a summary per exit; --out writes them as CSV. Under `torchrun --nproc_per_node N` every
rank classifies its share of the inputs and rank 0 writes the merged results. Without --teacher-weights the
open_clip teacher has random weights (always the same ones), and the output says so."""

from __future__ import annotations

import argparse
import csv
import pathlib
from dataclasses import asdict, dataclass

from . import distributed
from .common import (
    UserError,
    add_precision_argument,
    autocast,
    check_device,
    config_from_preset,
    csv_list,
    describe_precision,
    floats,
    one_line,
    progress,
    resolve_precision,
)
from .inputs import InputDataset, as_list, collect_inputs

CHECKPOINT_ERRORS = (ValueError, OSError, TypeError, KeyError, RuntimeError)  # plus safetensors' own error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (searched recursively), .txt files listing inputs, .safetensors token files",
    )
    parser.add_argument(
        "--labels", type=csv_list, required=True, help="comma-separated class names, or a .txt file with one per line"
    )
    parser.add_argument("--checkpoint", help="a WaveCLIP checkpoint folder (save_pretrained / waveclip distill)")
    parser.add_argument(
        "--teacher-weights", help="open_clip teacher checkpoint file or cached pretrained tag (default: random)"
    )
    parser.add_argument("--thresholds", type=floats, help="margin gate per non-final stage, e.g. 0.5,0.5,0.5")
    parser.add_argument("--preset", default="waveclip-vit-b-16", help="model preset without --checkpoint")
    parser.add_argument("--impl", default="auto", help="kernel implementation (auto, triton, cuda, cpu, reference)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    add_precision_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per batch (default 16)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0: load inline)")
    parser.add_argument(
        "--native-resolution",
        action="store_true",
        help="run a picture smaller than the tower's image size at the largest image_size / 2**k it reaches "
        "without upsampling, answered with the stages that size has",
    )
    parser.add_argument(
        "--out", metavar="FILE.csv", help="write one row per input here, and the per-exit summary to FILE_exits.csv"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random class embeddings of a tower without a teacher (default 0)",
    )


@dataclass
class Row:
    path: str
    answer: str
    probability: float
    exit_stage: int
    gflops: float
    input_size: str  # "HxW" of the preprocessed input (or of the image a token file comes from)


# ----------------------------------------------------------------------------------------- options


def _labels(values: list[str]) -> list[str]:
    if len(values) == 1 and values[0].lower().endswith(".txt"):
        path = pathlib.Path(values[0])
        if not path.is_file():
            raise UserError(f"no such labels file: {path}")
        values = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not values:
        raise UserError("--labels needs at least one class name, e.g. --labels cat,dog")
    if len(set(values)) != len(values):
        raise UserError(f"--labels has duplicate class names: {values}")
    return values


def _summary_path(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(f"{out.stem}_exits.csv")


def _check_options(args) -> None:
    """Everything that can be checked before a model is loaded."""
    args.labels = _labels(args.labels)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.out is not None:
        out = pathlib.Path(args.out)
        if out.suffix.lower() != ".csv":
            raise UserError(f"--out must end in .csv, got {args.out}")
        for path in (out, _summary_path(out)):
            if path.is_dir():
                raise UserError(f"--out: {path} is a folder")
        existing = next((p for p in out.parents if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise UserError(f"--out: {existing} is not a folder")
    if args.checkpoint and not pathlib.Path(args.checkpoint).is_dir():
        raise UserError(f"no such checkpoint folder: {args.checkpoint}")
    if not args.checkpoint:
        config_from_preset(args.preset)  # ValueError naming the known presets
    check_device(args.device)
    args.precision = resolve_precision(args.precision, args.device)


# ------------------------------------------------------------------------------------------ models


def _load_checkpoint(args):
    from safetensors import SafetensorError

    from waveclip.model import WaveCLIP

    try:
        return WaveCLIP.from_pretrained(args.checkpoint, impl=args.impl, device=args.device)
    except (*CHECKPOINT_ERRORS, SafetensorError) as err:
        message = one_line(err)
        if str(args.checkpoint) not in message:
            message = f"cannot load the checkpoint {args.checkpoint}: {message}"
        raise UserError(message) from err


def _classifier(args):
    """The zero-shot classifier over the WaveCLIP tower, and the lines that say where its parts came from."""
    import torch

    from waveclip.interop import TEACHER_SEED, load_paired_teacher, load_teacher
    from waveclip.model import WaveCLIP
    from waveclip.zeroshot import ZeroShotClassifier

    notes = []
    model = _load_checkpoint(args) if args.checkpoint else None
    if model is not None:
        notes.append(f"WaveCLIP tower: checkpoint {args.checkpoint}")
    config = model.config if model is not None else config_from_preset(args.preset)
    if args.thresholds is not None and len(args.thresholds) != config.levels:
        raise UserError(
            f"--thresholds needs {config.levels} values (one per non-final stage), got {len(args.thresholds)}"
        )
    if model is None and not config.teacher:
        raise UserError(f"preset {args.preset} names no teacher: pass --checkpoint")
    teacher = None
    if config.teacher:
        if model is not None:  # the very text tower the checkpoint was paired with
            teacher = load_paired_teacher(config, args.teacher_weights)
        else:
            teacher = load_teacher(config.teacher, weights=args.teacher_weights, quick_gelu=config.quick_gelu)
        teacher = teacher.to(args.device)
        weights = args.teacher_weights or config.teacher_weights
        which = f"weights {weights}" if weights else f"RANDOM weights (seed {TEACHER_SEED})"
        notes.append(f"teacher {config.teacher}: {which}")
    if model is None:
        model = WaveCLIP.from_open_clip(teacher, config, impl=args.impl)
        notes.append(f"WaveCLIP tower: initialised from the teacher (preset {args.preset}, not distilled)")
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    notes.append(f"precision: {describe_precision(args.precision)}")
    if teacher is not None:
        import open_clip

        classifier = ZeroShotClassifier.from_teacher(
            model, teacher, open_clip.get_tokenizer(config.teacher), args.labels, thresholds=args.thresholds
        )
        if not args.teacher_weights:
            notes.append("class text embeddings from a RANDOM-weight text tower: the answers are not meaningful")
    else:
        generator = torch.Generator().manual_seed(args.seed)
        embeddings = torch.randn(len(args.labels), config.embed_dim, generator=generator)
        classifier = ZeroShotClassifier(model, embeddings, args.labels, thresholds=args.thresholds)
        notes.append(f"the model has no teacher text tower: class embeddings are RANDOM (seed {args.seed})")
    return classifier, notes


# ---------------------------------------------------------------------------------------- predict


class ExitCosts:
    """Cumulative GFLOPs per exit at each input size of a tower, computed once per size."""

    def __init__(self, config):
        self.config, self.table = config, {}

    def __call__(self, size: tuple[int, int], stage: int) -> float:
        from waveclip.flops import exit_gflops

        if size not in self.table:
            default = size == self.config.image_size
            self.table[size] = exit_gflops(self.config) if default else exit_gflops(self.config, image_size=size)
        return self.table[size][stage]


def _token_stages(classifier, item):
    """A token file's stages as the tower's leading stage tokens (1, Gh*Gw, dim_s), in the model's dtype.

    A file tokenized at image_size / 2**k with L-k levels holds the tower's first stages divided by 2**k
    (docs/design.md section 1, item 6), so they are scaled back.
    """
    model, st = classifier.model, item.data
    config = model.config
    (H, W), L = config.image_size, config.levels
    k = next((k for k in range(L + 1) if st.image_size == (H >> k, W >> k) and st.levels == L - k), None)
    if st.grid != config.grid or st.color != config.color or k is None:
        raise UserError(
            f"token file {item.path} ({st.image_size[0]}x{st.image_size[1]} px, L={st.levels}, grid {st.grid}, "
            f"{st.color}) does not fit this tower: it takes image_size / 2**k with L-k levels "
            f"({H}x{W} px, L={L}; grid {config.grid}, {config.color})"
        )
    return [(t * 2**k)[None].to(model.proj.device, model.dtype) for t in st.tokens], st.image_size


def _predict_tokens(classifier, tokens) -> tuple[int, int, float]:
    """Classify one input from its leading stage tokens, feeding the tower one stage at a time.

    Returns:
        (label, exit stage, probability of the label); the last stage the file holds always answers.
    """
    model, s = classifier.model, 0
    state = model.start(tokens=[tokens[0]])
    while True:
        probs = classifier.probabilities(state.latest())
        if s == len(tokens) - 1 or float(classifier.margin(probs)[0]) >= classifier.thresholds[s]:
            label = int(probs[0].argmax())
            return label, s, float(probs[0, label])
        s += 1
        model.refine(state, tokens=tokens[s])


def _classify_batch(classifier, items, costs: ExitCosts, device: str, precision: str) -> list[tuple[int, Row]]:
    import torch

    names = classifier.class_names
    rows = []
    images: dict[tuple[int, int], list] = {}
    for item in items:
        if item.kind == "error":
            raise UserError(item.data)
        if item.kind == "image":
            images.setdefault(tuple(item.data.shape[-2:]), []).append(item)
    with autocast(precision, device):
        for size, group in images.items():
            x = torch.stack([item.data for item in group]).to(device)
            for item, p in zip(group, classifier.predict(x)):
                prob = float(p.probs[p.label])
                row = Row(item.path, names[p.label], prob, p.exit_stage, costs(size, p.exit_stage), _hw(size))
                rows.append((item.index, row))
        for item in (i for i in items if i.kind == "tokens"):
            tokens, size = _token_stages(classifier, item)
            label, stage, prob = _predict_tokens(classifier, tokens)
            rows.append((item.index, Row(item.path, names[label], prob, stage, costs(size, stage), _hw(size))))
    return rows


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _classify_share(classifier, paths, world, args) -> list[tuple[int, Row]]:
    import torch

    indices = world.share(len(paths))
    dataset = InputDataset([paths[i] for i in indices], indices, classifier.model.config, args.native_resolution)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=as_list
    )
    rows, costs = [], ExitCosts(classifier.model.config)
    quiet = not world.is_main or len(loader) < 2
    for batch in progress(loader, desc="classify", unit="batch", total=len(loader), disable=quiet):
        rows += _classify_batch(classifier, batch, costs, args.device, args.precision)
    return rows


# ----------------------------------------------------------------------------------------- output


def exit_summary(rows: list[Row], num_exits: int) -> list[dict]:
    """Per exit stage: how many inputs answered there, their share, and the GFLOPs they spent."""
    out = []
    for s in range(num_exits):
        spent = [r.gflops for r in rows if r.exit_stage == s]
        out.append(
            {
                "exit_stage": s,
                "images": len(spent),
                "share": len(spent) / len(rows),
                "mean_gflops": sum(spent) / len(spent) if spent else 0.0,
                "total_gflops": sum(spent),
            }
        )
    return out


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _format(row: dict) -> dict:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def _report(classifier, rows: list[Row], args) -> None:
    from waveclip.flops import teacher_gflops_analytic

    config = classifier.model.config
    if args.out is None:
        width = max(len(r.path) for r in rows)
        print(f"{'input':<{width}}  {'label':<16} {'prob':>6}  exit  GFLOPs")
        for r in rows:
            print(f"{r.path:<{width}}  {r.answer:<16} {r.probability:6.3f}  {r.exit_stage:>4}  {r.gflops:.4g}")
    summary = exit_summary(rows, config.levels + 1)
    print(f"{'exit':>4} {'inputs':>7} {'share':>6} {'GFLOPs/input':>12}")
    for s in summary:
        print(f"{s['exit_stage']:>4} {s['images']:>7} {100 * s['share']:>5.1f}% {s['mean_gflops']:>12.4g}")
    mean = sum(r.gflops for r in rows) / len(rows)
    teacher = teacher_gflops_analytic(config)
    print(
        f"{len(rows)} input{'s' * (len(rows) != 1)}; thresholds {', '.join(f'{t:g}' for t in classifier.thresholds)}; "
        f"precision "
        f"{args.precision}; mean {mean:.4g} GFLOPs per input ({100 * mean / teacher:.0f}% of the teacher's "
        f"{teacher:.4g} at {_hw(config.image_size)})"
    )
    if args.out is not None:
        out = pathlib.Path(args.out)
        _write_csv(out, [_format(asdict(r)) for r in rows])
        _write_csv(_summary_path(out), [_format(s) for s in summary])
        print(f"wrote {out} and {_summary_path(out)}")


def run(args) -> int:
    _check_options(args)
    paths = collect_inputs(args.inputs)
    world = distributed.world_from_env()
    args.device = distributed.init(world, args.device)
    try:
        classifier, notes = _classifier(args)
        if world.is_main:
            for note in notes:
                print(f"note: {note}")
        try:
            rows, error = _classify_share(classifier, paths, world, args), None
        except (UserError, ValueError, RuntimeError) as err:
            if world.size == 1:
                raise
            rows, error = [], one_line(err)  # the other ranks must still reach the gather
        shares = distributed.gather_all(world, (rows, error))
        errors = [e for _, e in shares if e is not None]
        if errors:
            if world.is_main:
                raise UserError(errors[0])
            return 1
        if world.is_main:
            merged = sorted((pair for share, _ in shares for pair in share), key=lambda pair: pair[0])
            _report(classifier, [row for _, row in merged], args)
    finally:
        distributed.finish(world)
    return 0
