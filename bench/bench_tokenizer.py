"""Tokenizer microbenchmark: ours per impl against conv-based DWT libraries and a plain copy.

    python -m bench.bench_tokenizer --device cpu --out bench/results/cpu

Every provider gets the same images and produces the same tokens (checked against the float64
reference: `max_err`): the BT.601 colour transform, an L-level orthonormal Haar DWT and the
rearrangement into one token grid. pytorch_wavelets (`DWTForward(J=L, wave="haar", mode="zero")`)
and ptwt (`wavedec2`) run after the reference colour transform and before the reference
rearrangement. The roof is a copy of the same bytes (read the image, write an image-sized
tensor): the tokenizer moves exactly that much data, so `frac_copy` is its share of copy bandwidth.
On the CPU, `frac_copy_alt` is the same share with the provider's calls and the copy's alternated.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import warnings
from dataclasses import dataclass

import torch

import waveclip_kernels as wk
from waveclip_kernels import extension
from waveclip_kernels.reference.wavelet import apply_color, stage_to_tokens

from . import common


@dataclass(frozen=True)
class Case:
    batch: int
    size: int
    dtype: torch.dtype = torch.float32
    levels: int = 3
    grid: int = 7
    color: str = "ycbcr"
    threads: int | None = None  # CPU: torch threads for this case (None: leave torch's setting)

    @property
    def name(self) -> str:
        name = f"B={self.batch} {self.size}px {common.dtype_name(self.dtype)} L={self.levels} grid {self.grid}"
        return name + (f" {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "")

    def params(self) -> dict:
        return {
            "batch": self.batch,
            "image_size": self.size,
            "dtype": common.dtype_name(self.dtype),
            "levels": self.levels,
            "grid": self.grid,
            "color": self.color,
            "case_threads": self.threads or torch.get_num_threads(),
        }


CPU_CASES = (Case(32, 224, threads=1), Case(32, 224, threads=2))
QUICK_CASES = (Case(2, 64, levels=2, grid=4),)
GPU_CASES = (Case(256, 224), Case(256, 224, torch.float16), Case(64, 448, grid=14))


def pytorch_wavelets_tokenize(dwt, images: torch.Tensor, case: Case) -> list[torch.Tensor]:
    """Colour transform -> pytorch_wavelets DWTForward -> the stage/token rearrangement."""
    x = apply_color(images, case.color)
    low, highs = dwt(x)  # highs: finest first, each (B, C, 3, h, w) in (H, V, D) order
    B = images.shape[0]
    stages = [low] + [h.reshape(B, -1, *h.shape[-2:]) for h in highs[::-1]]
    return [stage_to_tokens(s, (case.grid, case.grid)) for s in stages]


def ptwt_tokenize(wavelet, images: torch.Tensor, case: Case) -> list[torch.Tensor]:
    """Colour transform -> ptwt.wavedec2 -> the stage/token rearrangement."""
    import ptwt

    x = apply_color(images, case.color)
    coeffs = ptwt.wavedec2(x, wavelet, level=case.levels, mode="zero")  # [A_L, (H, V, D)_L, ..., (H, V, D)_1]
    B = images.shape[0]
    details = [torch.stack(tuple(bands), dim=2).reshape(B, -1, *bands[0].shape[-2:]) for bands in coeffs[1:]]
    stages = [coeffs[0], *details]
    return [stage_to_tokens(s, (case.grid, case.grid)) for s in stages]


def providers(images: torch.Tensor, case: Case, device: torch.device) -> list[dict]:
    """[{provider, backend, fn, note}] for one case; fn() tokenizes `images` (or copies them)."""
    grid = (case.grid, case.grid)
    out = common.impl_providers(
        "wavelet_tokenize", device, lambda impl: wk.wavelet_tokenize(images, case.levels, grid, case.color, impl=impl)
    )
    for p in out:
        if p["provider"] == "waveclip:cpu" and "fn" in p and device.type == "cpu":
            kernel = extension.load().cpu_tokenizer_kernel(images, case.levels, *grid, images.dtype)
            p["backend"] = f"cpu ({kernel})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pytorch_wavelets imports the deprecated pkg_resources
            from pytorch_wavelets import DWTForward
        dwt = DWTForward(J=case.levels, wave="haar", mode="zero").to(device=device, dtype=case.dtype)
        fn = functools.partial(pytorch_wavelets_tokenize, dwt, images, case)
        note = "colour + DWTForward(haar, zero) + rearrangement"
        out.append({"provider": "pytorch_wavelets", "backend": "conv2d", "fn": fn, "note": note})
    except ImportError as err:
        out.append({"provider": "pytorch_wavelets", "backend": "", "status": "unavailable", "note": str(err)})
    try:
        import ptwt  # noqa: F401
        import pywt

        fn = functools.partial(ptwt_tokenize, pywt.Wavelet("haar"), images, case)
        note = "colour + wavedec2(haar, zero) + rearrangement"
        out.append({"provider": "ptwt", "backend": "conv2d", "fn": fn, "note": note})
    except ImportError as err:
        out.append({"provider": "ptwt", "backend": "", "status": "unavailable", "note": str(err)})
    note = "roof: read + write the same bytes"
    out.append({"provider": "copy", "backend": "aten::clone", "fn": images.clone, "note": note})
    return out


def run_case(case: Case, device: torch.device, budget_s: float = 1.0, rows=None) -> list[dict]:
    threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        return _run_case(case, device, budget_s, rows)
    finally:
        torch.set_num_threads(threads)


def _run_case(case: Case, device: torch.device, budget_s: float, rows) -> list[dict]:
    torch.manual_seed(0)
    images = torch.randn(case.batch, 3, case.size, case.size, device=device, dtype=case.dtype)
    expected = wk.wavelet_tokenize(images.double(), case.levels, case.grid, case.color, impl="reference")
    nbytes = 2 * images.numel() * images.element_size()  # read the image, write as many token elements
    rows = [] if rows is None else rows  # a common.CsvRows writes each row as it comes
    first = len(rows)
    fns = {}  # provider -> fn, for the alternated timing
    for p in providers(images, case, device):
        row = {"bench": "tokenizer", "case": case.name, "provider": p["provider"], "backend": p["backend"]}
        row |= case.params() | {"status": p.get("status", "ok"), "note": p.get("note", "")}
        if "fn" in p:
            try:
                got = p["fn"]()
                if p["provider"] != "copy":
                    row["max_err"] = max((g.double() - e).abs().max().item() for g, e in zip(got, expected))
                timing = common.time_fn(p["fn"], device, budget_s=budget_s, flush_l2=True)
                row |= {
                    "ms": timing.ms,
                    "ms_min": timing.ms_min,
                    "cpu_ms": timing.cpu_ms,
                    "reps": timing.reps,
                    "bytes": nbytes,
                }
                row |= common.rates(timing.ms, nbytes=nbytes)
                fns[p["provider"]] = p["fn"]
            except Exception as err:  # a provider that fails is reported, the others still run
                row |= {"status": "error", "note": common.first_line(err)}
        rows.append(row)
    copy_gbps = next((r["gbps"] for r in rows[first:] if r["provider"] == "copy" and "gbps" in r), None)
    for r in rows[first:]:
        if copy_gbps and "gbps" in r:
            r["frac_copy"] = r["gbps"] / copy_gbps
    _alternate_with_copy(rows[first:], fns, budget_s, device)
    if isinstance(rows, common.CsvRows):
        common.write_csv(rows.path, rows, device)
    return rows


def _alternate_with_copy(rows: list[dict], fns: dict, budget_s: float, device: torch.device) -> None:
    """CPU: adds `frac_copy_alt`, the copy's share of each provider's time with their calls alternated,
    which exposes both to the same load on a shared machine (`frac_copy` compares two separate loops)."""
    if device.type != "cpu" or "copy" not in fns:
        return
    for r in rows:
        if r["provider"] in fns:
            timing, copy = common.time_interleaved([fns[r["provider"]], fns["copy"]], device, budget_s=budget_s)
            r["frac_copy_alt"] = copy.ms / timing.ms


def run(out_dir=common.DEFAULT_OUT, device="cpu", cases=None, quick: bool = False, budget_s: float = 1.0) -> list[dict]:
    """Benchmark every case; writes tokenizer.csv and tokenizer.png into `out_dir`, returns the rows."""
    device = torch.device(device)
    if quick:
        budget_s = min(budget_s, 0.05)
    if cases is None:
        cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    out_dir = pathlib.Path(out_dir)
    rows = common.CsvRows(out_dir / "tokenizer.csv", device)
    for case in cases:
        run_case(case, device, budget_s, rows)
    common.plot_cases(out_dir / "tokenizer.png", rows, f"wavelet tokenizer, {common.device_name(device)}")
    return rows


COLUMNS = ["case", "provider", "backend", "status", "ms", "gbps", "frac_copy", "frac_copy_alt", "max_err"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for tokenizer.csv / .png")
    parser.add_argument("--batch", type=int, help="one case with this batch (with --size, --dtype)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--grid", type=int, help="token grid (default: size // 32, 7 at 224 px)")
    parser.add_argument("--quick", action="store_true", help="one tiny case (smoke run)")
    args = parser.parse_args(argv)
    cases = None
    if args.batch:
        grid = args.grid or args.size // 32
        cases = [Case(args.batch, args.size, common.parse_dtype(args.dtype), args.levels, grid)]
    rows = run(args.out, args.device, cases, args.quick)
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
