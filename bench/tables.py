"""Markdown tables for the README from the benchmark CSVs, with their exact parameters.

    python -m bench.tables bench/results/cpu            # writes bench/results/cpu/README_tables.md
    python -m bench.tables bench/results/cpu --stdout   # prints it instead

Each CSV becomes a section headed by the stamp its rows carry (device, torch, Triton, threads, date,
commit), then one table per case (shape). Rows that did not run keep their status and reason.
"""

from __future__ import annotations

import argparse
import pathlib

from . import common

# (title, columns with their headers) per CSV; other CSVs get every non-stamp column.
LAYOUTS = {
    "tokenizer.csv": (
        "Wavelet tokenizer",
        [("provider", "provider"), ("backend", "backend"), ("ms", "ms"), ("cpu_ms", "CPU ms"), ("gbps", "GB/s"),
         ("frac_copy", "of copy"), ("frac_copy_alt", "of copy, alternated"), ("max_err", "max err")],
    ),
    "attention.csv": (
        "Block-causal attention",
        [("provider", "provider"), ("backend", "backend ran"), ("ms", "ms"), ("cpu_ms", "CPU ms"),
         ("vs_naive", "vs naive"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("max_err", "max err")],
    ),
    "gate.csv": (
        "Zero-shot classification under the gate",
        [("provider", "provider"), ("ms", "ms / batch"), ("cpu_ms", "CPU ms"), ("images_per_s", "images/s"),
         ("exits", "exits per stage"),
         ("mean_gflops", "GFLOPs / image"), ("speedup_vs_teacher", "vs teacher")],
    ),
    "flops.csv": (
        "GFLOPs per exit (1 multiply-add = 2 FLOPs)",
        [("preset", "preset"), ("exit", "exit"), ("tokens", "tokens"), ("gflops", "GFLOPs"),
         ("gflops_no_layernorm", "without LayerNorm"), ("percent_of_teacher", "% of teacher")],
    ),
}  # fmt: skip
ORDER = ("tokenizer.csv", "attention.csv", "model.csv", "gate.csv", "flops.csv")
CASE_PARAMS = {
    "tokenizer.csv": ("batch", "image_size", "dtype", "levels", "grid", "color"),
    "attention.csv": ("bench", "batch", "heads", "stages", "stage_tokens", "head_dim", "dtype", "step_stage"),
}


def _fmt(value: str, column: str) -> str:
    if value in ("", None):
        return ""
    try:
        x = float(value)
    except ValueError:
        return str(value).replace("|", "/")
    if column in ("frac_copy", "frac_copy_alt"):
        return f"{100 * x:.3g}%"
    if column in ("percent_of_teacher",):
        return f"{x:.1f}%"
    if column == "max_err":
        return f"{x:.1e}"
    if column in ("exit", "tokens", "batch"):
        return str(int(x))
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.0f}"


def _markdown(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(header for _, header in columns) + " | note |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for row in rows:
        cells = [_fmt(row.get(key, ""), key) for key, _ in columns]
        note = row.get("note", "") or ""
        if row.get("status", "ok") not in ("ok", ""):
            note = f"{row['status']}: {note}" if note else row["status"]
        lines.append("| " + " | ".join(cells) + f" | {note.replace('|', '/')} |")
    return lines


def _stamp(rows: list[dict]) -> str:
    first = rows[0]
    parts = [first.get("device", "?"), f"torch {first.get('torch', '?')}", f"Triton {first.get('triton', '?')}"]
    if first.get("threads"):
        parts.append(f"torch threads {first['threads']}")
    if first.get("load1"):
        parts.append(f"load average {first['load1']}")
    parts += [first.get("date", "?"), f"commit {first.get('commit', '?')}"]
    return ", ".join(parts)


def _columns(name: str, rows: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    if name in LAYOUTS:
        return LAYOUTS[name]
    keys = [k for k in rows[0] if k not in common.ENV_COLUMNS and k not in ("note", "status")]
    keys = [k for k in keys if any(r.get(k) not in ("", None) for r in rows)]
    return name.removesuffix(".csv"), [(k, k) for k in keys]


def render(name: str, rows: list[dict]) -> str:
    """One markdown section for the rows of one CSV (`name` picks the layout)."""
    if not rows:
        return ""
    title, columns = _columns(name, rows)
    lines = [f"### {title}", "", f"{_stamp(rows)}.", ""]
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    for case in cases:
        sub = [r for r in rows if r.get("case", "") == case]
        if case:
            params = [f"{p}={sub[0][p]}" for p in CASE_PARAMS.get(name, ()) if sub[0].get(p) not in ("", None)]
            lines += [f"**{case}**" + (f" ({', '.join(params)})" if params else ""), ""]
        lines += _markdown(sub, columns) + [""]
    return "\n".join(lines)


def tables_markdown(folder: str | pathlib.Path) -> str:
    folder = pathlib.Path(folder)
    found = sorted(folder.glob("*.csv"), key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
    sections = [render(path.name, common.read_csv(path)) for path in found]
    return "\n".join(s for s in sections if s)


def write_tables(folder: str | pathlib.Path) -> pathlib.Path:
    """Write README_tables.md into `folder` from every CSV there; returns its path."""
    path = pathlib.Path(folder) / "README_tables.md"
    path.write_text(tables_markdown(folder))
    return path


# The PyTorch path whose error on the same inputs bounds ours (the team's rule: at most 2x it).
ERROR_BASELINE = {"tokenizer": "ptwt", "attention_full": "sdpa_mask:auto", "attention_step": "copy+sdpa"}


def check_errors(folder: str | pathlib.Path, factor: float = 2.0, atol: float = 1e-6) -> list[str]:
    """Violations of `max_err(ours) <= factor * max_err(PyTorch baseline) + atol`, case by case."""
    problems = []
    for name in ("tokenizer.csv", "attention.csv"):
        path = pathlib.Path(folder) / name
        if not path.is_file():
            continue
        rows = [r for r in common.read_csv(path) if r.get("status") == "ok" and r.get("max_err")]
        for case in dict.fromkeys(r["case"] for r in rows):
            sub = [r for r in rows if r["case"] == case]
            baseline = next((r for r in sub if r["provider"] == ERROR_BASELINE.get(r["bench"])), None)
            if baseline is None:
                continue
            bound = factor * float(baseline["max_err"]) + atol
            for r in sub:
                if r["provider"].startswith("waveclip:") and float(r["max_err"]) > bound:
                    problems.append(
                        f"{name} {case}: {r['provider']} max_err {float(r['max_err']):.3g} > {factor:g} x "
                        f"{baseline['provider']}'s {float(baseline['max_err']):.3g} + {atol:g}"
                    )
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default=str(common.DEFAULT_OUT / "cpu"), help="folder of CSVs")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing README_tables.md")
    parser.add_argument(
        "--check-errors", action="store_true", help="exit 1 when a kernel's error exceeds 2x PyTorch's on its case"
    )
    args = parser.parse_args(argv)
    if args.check_errors:
        problems = check_errors(args.folder)
        print("\n".join(problems) or "errors: every kernel within 2x of PyTorch's own error on the same inputs")
        raise SystemExit(1 if problems else 0)
    if args.stdout:
        print(tables_markdown(args.folder))
    else:
        print(write_tables(args.folder))


if __name__ == "__main__":
    main()
