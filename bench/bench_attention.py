"""Attention microbenchmark: block-causal full pass and the incremental KV-append step.

    python -m bench.bench_attention --device cpu --out bench/results/cpu

    python -m bench.bench_attention --device cpu --threads 1 2   # both thread counts, one CSV

Full pass (q, k, v of S stage blocks of n tokens, a query of block s sees blocks <= s), every
provider on the same tensors:
  waveclip:auto       `waveclip_kernels.block_causal_attention` with impl="auto" (backend: the impl it ran)
  waveclip:<impl>     the same for each impl that runs here
  sdpa_mask:<backend> SDPA given the boolean block-causal mask, one backend pinned with
                      `torch.nn.attention.sdpa_kernel` (a backend that refuses is reported as such);
                      sdpa_mask:auto lets PyTorch choose and reports its choice
  sdpa_dense          SDPA without a mask: the dense speed of light (not block-causal: no max_err)
  flex_compiled       `torch.compile(flex_attention)` with a BlockMask built once and cached
  sdpa_per_stage      one SDPA per stage: that stage's queries against its prefix (the naive composition)

Incremental step (stage s of n new tokens joins a cache already holding c = s*n):
  waveclip:auto       `attention_with_kv_append` with impl="auto": append in place and attend, one call
  waveclip:<impl>     the same for each impl that runs here
  copy+sdpa           `copy_` k/v into the cache, then SDPA without mask on the prefix [0, c+n) (naive)

`vs_naive` is a row's time over the naive composition's in the same case, same run (below 1 is
faster). The auto and naive rows are timed interleaved (call for call, so that a shared machine's
load changes hit both alike); `--threads 1 2` runs every case at each thread count, into one CSV.

TFLOP/s always counts the useful work, docs/design.md's `4*B*H*D*sum_s n_s*P_s` (P_s = keys visible to
block s), whatever a provider computes. GB/s counts the minimum traffic: q, k, v read and the output
written once (full pass); q, k_new, v_new and the old prefix read, the appended slots and the output
written (step). On the CPU the Triton impl is excluded (its interpreter is far too slow to time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import pathlib
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import waveclip_kernels as wk
from waveclip_kernels.reference import attention as ref

from . import common

PINNED = (
    SDPBackend.MATH,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
)


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int = 12
    stages: int = 4
    stage_tokens: int = 50  # one class token + the grid tokens of a stage
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    label: str = ""

    @property
    def block_sizes(self) -> list[int]:
        return [self.stage_tokens] * self.stages

    @property
    def name(self) -> str:
        shape = f"B={self.batch} H={self.heads} {self.stages}x{self.stage_tokens} D={self.head_dim}"
        return f"{self.label + ': ' if self.label else ''}{shape} {common.dtype_name(self.dtype)}"

    def params(self) -> dict:
        return {
            "batch": self.batch,
            "heads": self.heads,
            "stages": self.stages,
            "stage_tokens": self.stage_tokens,
            "head_dim": self.head_dim,
            "dtype": common.dtype_name(self.dtype),
        }


CPU_CASES = (Case(4, label="224 preset"), Case(1, stage_tokens=197, label="448 preset"))
GPU_CASES = (
    Case(128, dtype=torch.float16, label="224 preset"),
    Case(32, stage_tokens=197, dtype=torch.float16, label="448 preset"),
)
QUICK_CASES = (Case(1, heads=2, stages=3, stage_tokens=5, head_dim=16, label="tiny"),)


def block_causal_flops(batch: int, heads: int, head_dim: int, block_sizes: list[int]) -> int:
    """4*B*H*D*sum_s n_s*P_s: QK^T and PV over the allowed (query, key) pairs, 1 MAC = 2 FLOPs."""
    pairs, prefix = 0, 0
    for n in block_sizes:
        prefix += n
        pairs += n * prefix
    return 4 * batch * heads * head_dim * pairs


def sdpa_choice(q, k, v, mask=None) -> str:
    """The SDPA backend PyTorch picks for these inputs under the current `sdpa_kernel` settings."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask)).name
    except (RuntimeError, ValueError, AttributeError):
        return "unknown"


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _block_mask(block_sizes: tuple[int, ...], device: str):
    """BlockMask of the block-causal pattern, built once per (block sizes, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    level = ref.block_levels(list(block_sizes), device)

    def block_causal(b, h, q_idx, kv_idx):
        return level[q_idx] >= level[kv_idx]

    n = sum(block_sizes)
    return create_block_mask(block_causal, None, None, n, n, device=device)


def per_stage_sdpa(q, k, v, block_sizes: list[int]) -> torch.Tensor:
    """Each stage's queries against its prefix with dense SDPA, written into one output."""
    out = torch.empty_like(q)
    end = 0
    for n in block_sizes:
        start, end = end, end + n
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
    return out


def auto_provider(op: str, device: torch.device, call) -> dict:
    """impl="auto", labelled with the impl it resolves to."""
    chosen = wk.resolve_impl("auto", op, device)
    return {"provider": "waveclip:auto", "backend": chosen, "fn": functools.partial(call, "auto"), "auto": True}


def full_pass_providers(q, k, v, block_sizes: list[int], device: torch.device, flex: bool = True) -> list[dict]:
    """[{provider, backend, fn, context, note}] for the block-causal full pass."""
    mask = ref.block_causal_mask(block_sizes, device)

    def ours(impl):
        return wk.block_causal_attention(q, k, v, block_sizes, impl=impl)

    out = [auto_provider("block_causal_attention", device, ours)]
    out += common.impl_providers("block_causal_attention", device, ours)
    for backend in PINNED:
        out.append(
            {
                "provider": f"sdpa_mask:{backend.name.lower().removesuffix('_attention')}",
                "backend": backend.name,
                "fn": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                "context": functools.partial(sdpa_kernel, backend),
                "note": "boolean block-causal mask, backend pinned",
            }
        )
    out.append(
        {
            "provider": "sdpa_mask:auto",
            "backend": sdpa_choice(q, k, v, mask),
            "fn": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "note": "boolean block-causal mask, PyTorch's choice",
        }
    )
    out.append(
        {
            "provider": "sdpa_dense",
            "backend": sdpa_choice(q, k, v),
            "fn": lambda: F.scaled_dot_product_attention(q, k, v),
            "dense": True,
            "note": "no mask: dense speed of light (computes every pair; output not block-causal)",
        }
    )
    if flex:
        out.append(
            {
                "provider": "flex_compiled",
                "backend": f"flex/inductor-{device.type}",
                "fn": lambda: _compiled_flex()(q, k, v, block_mask=_block_mask(tuple(block_sizes), str(device))),
                "note": "torch.compile(flex_attention), cached BlockMask",
            }
        )
    else:
        out.append(
            {
                "provider": "flex_compiled",
                "backend": "",
                "status": "skipped",
                "note": "in quick mode (compiling takes tens of seconds)",
            }
        )
    last = slice(sum(block_sizes) - block_sizes[-1], None)
    out.append(
        {
            "provider": "sdpa_per_stage",
            "backend": sdpa_choice(q[:, :, last], k, v),
            "fn": lambda: per_stage_sdpa(q, k, v, block_sizes),
            "note": "one SDPA per stage over its prefix",
            "naive": True,
        }
    )
    return out


def step_providers(q, k_new, v_new, k_cache, v_cache, lens, c: int, device: torch.device) -> list[dict]:
    """[{provider, backend, fn, note}] for one incremental step (append n at c, attend to [0, c+n))."""
    n = q.shape[2]

    def ours(impl):
        return wk.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, lens, impl=impl)

    def copy_then_sdpa():
        k_cache[:, :, c : c + n].copy_(k_new)
        v_cache[:, :, c : c + n].copy_(v_new)
        return F.scaled_dot_product_attention(q, k_cache[:, :, : c + n], v_cache[:, :, : c + n])

    out = [auto_provider("attention_with_kv_append", device, ours)]
    out += common.impl_providers("attention_with_kv_append", device, ours)
    out.append(
        {
            "provider": "copy+sdpa",
            "backend": sdpa_choice(q, k_cache[:, :, : c + n], v_cache[:, :, : c + n]),
            "fn": copy_then_sdpa,
            "note": "copy_ into the cache, then SDPA without mask on the prefix",
            "naive": True,
        }
    )
    return out


def _measure(p: dict, check, device, budget_s: float, flush_l2: bool, prepare=None) -> dict:
    """Run one provider once (catching refusals and their reasons), check its output, then time it.

    Args:
        p: the provider.
        check: check(p, output) -> dict of columns (max_err, ...; "status": "wrong" when it is wrong).
        prepare: called before the checked call (e.g. poisoning the cache slots it must write).
    """
    row = {"provider": p["provider"], "backend": p["backend"]}
    row |= {"status": p.get("status", "ok"), "note": p.get("note", "")}
    if "fn" not in p:
        return row
    with p.get("context", contextlib.nullcontext)():
        if prepare is not None:
            prepare()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            try:
                got = p["fn"]()
            except Exception as err:  # a refusal or failure is a result: report it, run the others
                reasons = [common.first_line(w.message, 100) for w in caught if "attention" in str(w.message).lower()]
                note = "; ".join(reasons[-3:]) or common.first_line(err)
                return row | {"status": "refused" if "context" in p else "error", "note": note}
            first_s = time.perf_counter() - start
        row |= check(p, got)
        if p.get("auto") or p.get("naive"):
            return row  # timed by `_time_paired`
        timing = common.time_fn(p["fn"], device, budget_s=budget_s, flush_l2=flush_l2)
    if p["provider"] == "flex_compiled":
        row["note"] += f"; first call incl. compile {first_s:.1f} s"
    return row | {"ms": timing.ms, "ms_min": timing.ms_min, "cpu_ms": timing.cpu_ms, "reps": timing.reps}


def _time_paired(providers: list[dict], rows: list[dict], device, budget_s: float) -> None:
    """Time the auto and naive providers of one case call for call, alternating, into their rows."""
    pair = [(p, r) for p, r in zip(providers, rows) if (p.get("auto") or p.get("naive")) and r["status"] == "ok"]
    if not pair:
        return
    timings = common.time_interleaved([p["fn"] for p, _ in pair], device, min_reps=7, budget_s=2 * budget_s)
    for (p, row), t in zip(pair, timings, strict=True):
        row |= {"ms": t.ms, "ms_min": t.ms_min, "cpu_ms": t.cpu_ms, "reps": t.reps}
        row["note"] = "; ".join(
            x
            for x in (
                row.get("note", ""),
                "timed interleaved with the naive composition"
                if p.get("auto")
                else "timed interleaved with waveclip:auto",
            )
            if x
        )


def _add_ratios(rows: list[dict]) -> None:
    """vs_naive: ms over the naive composition's ms, within the case."""
    naive = next((r for r in rows if r.get("naive") and r.get("ms")), None)
    for r in rows:
        r.pop("naive", None)
        if naive is not None and r.get("ms"):
            r["vs_naive"] = r["ms"] / naive["ms"]


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item()


def run_full_pass(case: Case, device: torch.device, budget_s: float, flex: bool, rows=None, extra=None) -> list[dict]:
    """The full pass of every provider; `extra`: columns added to each row."""
    torch.manual_seed(0)
    shape = (case.batch, case.heads, case.stages * case.stage_tokens, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=case.dtype) for _ in range(3))
    expected = ref.block_causal_attention(q.double(), k.double(), v.double(), case.block_sizes)
    flops = block_causal_flops(case.batch, case.heads, case.head_dim, case.block_sizes)
    nbytes = 4 * q.numel() * q.element_size()

    def check(p, got):
        return {} if p.get("dense") else {"max_err": _error(got, expected)}

    rows = [] if rows is None else rows  # a common.CsvRows writes each case's rows as they come
    providers = full_pass_providers(q, k, v, case.block_sizes, device, flex)
    case_rows = []
    for p in providers:
        row = {"bench": "attention_full", "case": case.name} | case.params() | {"step_stage": ""} | (extra or {})
        row |= _measure(p, check, device, budget_s, flush_l2=False)
        case_rows.append(row | {"naive": p.get("naive", False)})
    _time_paired(providers, case_rows, device, budget_s)
    for row in case_rows:
        if "ms" in row:
            row |= {"gflop": flops / 1e9, "bytes": nbytes} | common.rates(row["ms"], flops, nbytes)
    _add_ratios(case_rows)
    rows.extend(case_rows)
    return rows


def run_steps(case: Case, device: torch.device, budget_s: float, rows=None, extra=None) -> list[dict]:
    """Steps 1..S-1; before each provider the slots it must fill are set to NaN, so a provider that
    does not append (or appends elsewhere) shows up in `append_exact` and in its output. `extra`:
    columns added to each row."""
    torch.manual_seed(1)
    B, H, n, D = case.batch, case.heads, case.stage_tokens, case.head_dim
    n_max = case.stages * n
    k_cache, v_cache = (torch.randn(B, H, n_max, D, device=device, dtype=case.dtype) for _ in range(2))
    rows = [] if rows is None else rows
    for s in range(1, case.stages):
        c = s * n
        q, k_new, v_new = (torch.randn(B, H, n, D, device=device, dtype=case.dtype) for _ in range(3))
        lens = torch.full((B,), c, dtype=torch.int32, device=device)
        kc64, vc64 = k_cache.double(), v_cache.double()
        expected = ref.attention_with_kv_append(q.double(), k_new.double(), v_new.double(), kc64, vc64, lens.cpu())
        flops = 4 * B * H * D * n * (c + n)
        nbytes = (6 * n + 2 * c) * B * H * D * q.element_size()

        def poison(c=c):
            k_cache[:, :, c : c + n] = float("nan")
            v_cache[:, :, c : c + n] = float("nan")

        def check(p, got, c=c, k_new=k_new, v_new=v_new, expected=expected):
            exact = torch.equal(k_cache[:, :, c : c + n], k_new) and torch.equal(v_cache[:, :, c : c + n], v_new)
            return {"max_err": _error(got, expected), "append_exact": exact} | ({} if exact else {"status": "wrong"})

        providers = step_providers(q, k_new, v_new, k_cache, v_cache, lens, c, device)
        case_rows = []
        for p in providers:
            row = {"bench": "attention_step", "case": f"{case.name} step {s}"} | case.params() | {"step_stage": s}
            row |= (extra or {}) | _measure(p, check, device, budget_s, flush_l2=True, prepare=poison)
            case_rows.append(row | {"naive": p.get("naive", False)})
        _time_paired(providers, case_rows, device, budget_s)
        for row in case_rows:
            if "ms" in row:
                row |= {"gflop": flops / 1e9, "bytes": nbytes} | common.rates(row["ms"], flops, nbytes)
        _add_ratios(case_rows)
        rows.extend(case_rows)
    return rows


def run(
    out_dir=common.DEFAULT_OUT,
    device="cpu",
    cases=None,
    quick: bool = False,
    budget_s: float = 1.0,
    threads: list[int] | None = None,
) -> list[dict]:
    """Full pass and incremental steps for every case; writes attention.csv and two PNGs into `out_dir`.

    `threads`: run every case at each of these torch thread counts (default: torch's setting), each
    row stamped with its count.
    """
    device = torch.device(device)
    if quick:
        budget_s = min(budget_s, 0.05)
    if cases is None:
        cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    out_dir = pathlib.Path(out_dir)
    rows = common.CsvRows(out_dir / "attention.csv", device)
    before = torch.get_num_threads()
    try:
        for count in threads or [before]:
            torch.set_num_threads(count)
            counted = [dataclasses.replace(c, label=_thread_label(c.label, count, threads)) for c in cases]
            stamp = {"threads": count}
            for case in counted:  # on CUDA FlexAttention runs at the last case only: one cold compile
                flex = not quick and (device.type != "cuda" or case is counted[-1])
                run_full_pass(case, device, budget_s, flex, rows, stamp)
            for case in counted:
                run_steps(case, device, budget_s, rows, stamp)
    finally:
        torch.set_num_threads(before)
    full = [r for r in rows if r["bench"] == "attention_full"]
    steps = [r for r in rows if r["bench"] != "attention_full"]
    title = f"{{}}, {common.device_name(device)}"
    common.plot_cases(out_dir / "attention_full.png", full, title.format("block-causal attention, full pass"))
    common.plot_cases(out_dir / "attention_step.png", steps, title.format("incremental step: append + attend"))
    return full + steps


def _thread_label(label: str, count: int, threads: list[int] | None) -> str:
    if not threads:
        return label
    suffix = f"{count} thread{'s' if count > 1 else ''}"
    return f"{label}, {suffix}" if label else suffix


COLUMNS = ["case", "provider", "backend", "status", "ms", "vs_naive", "tflops", "gbps", "max_err", "note"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for attention.csv and the PNGs")
    parser.add_argument("--batch", type=int, help="one case with this batch (with --heads, --stages, ...)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--stage-tokens", type=int, default=50)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="one tiny case, no FlexAttention compile (smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", help="torch thread counts to run every case at")
    args = parser.parse_args(argv)
    cases = None
    if args.batch:
        dtype = common.parse_dtype(args.dtype)
        cases = [Case(args.batch, args.heads, args.stages, args.stage_tokens, args.head_dim, dtype)]
    rows = run(args.out, args.device, cases, args.quick, threads=args.threads)
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
