"""Training-step benchmark: forward + backward of block-causal attention, alone and inside the tower.

    python -m bench.bench_training --device cpu --out bench/results/cpu      # small batch, 1 thread
    python -m bench.bench_training --device cuda --out "$OUT"                 # GPU (bf16)

Every provider runs the same step on the same tensors, in one run:
  waveclip:<impl>   `waveclip_kernels.block_causal_attention` and its autograd formula (impl="triton":
                    the fused backward; the CPU impls: the per-block flash composition)
  sdpa_mask         SDPA given the boolean block-causal mask (PyTorch picks the backend; reported)
  flex_compiled     `torch.compile(flex_attention)` with a BlockMask built once and cached
  sdpa_per_stage    one SDPA per stage over its prefix, autograd through it (the naive composition)

Cases: the attention op at the 224 preset (4 stages of 50 tokens, 12 heads, head dim 64) and the
448 preset (4 x 197); on the GPU also at twice the 448 preset's tokens per stage, so that peak memory
at two sizes shows how it grows (O(N) for the fused kernels, O(N^2) for a dense mask). The tower cases
run a whole WaveCLIP forward + backward (random weights) with each provider as its attention.

Peak memory is the most memory allocated during one step beyond what was allocated before it: on
CUDA `torch.cuda.max_memory_allocated`; on the CPU (no allocator statistics) the largest total of
live tensor storages seen at the dispatcher during the step (`LiveBytes`: storages that kernels
allocate internally and free before returning are not seen). TFLOP/s counts 3.5x the forward's
useful FLOPs (`4*B*H*D*sum_s n_s*P_s`; the backward does 2.5x the forward's work, as FlashAttention
counts it).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import waveclip_kernels as wk
from waveclip import WaveCLIP, WaveCLIPConfig
from waveclip_kernels.reference import attention as ref

from . import common
from .bench_attention import _block_mask, _compiled_flex, block_causal_flops, per_stage_sdpa


@dataclass(frozen=True)
class Case:
    kind: str  # "attention" (the op alone) or "tower" (the whole WaveCLIP)
    preset: str  # waveclip preset whose stages, heads and head dim the case uses
    batch: int
    dtype: torch.dtype
    stage_tokens: int | None = None  # attention only: override the preset's tokens per stage

    def config(self) -> WaveCLIPConfig:
        return WaveCLIPConfig.from_preset(self.preset)

    @property
    def block_sizes(self) -> list[int]:
        sizes = self.config().block_sizes
        return [self.stage_tokens] * len(sizes) if self.stage_tokens else list(sizes)

    @property
    def name(self) -> str:
        tokens = "x".join(map(str, sorted(set(self.block_sizes))))
        return (
            f"{self.kind} {self.preset} B={self.batch} {len(self.block_sizes)}x{tokens} {common.dtype_name(self.dtype)}"
        )


CPU_CASES = (
    Case("attention", "waveclip-vit-b-16", 4, torch.float32),
    Case("attention", "waveclip-vit-b-16-448", 1, torch.float32),
    Case("tower", "waveclip-vit-b-16", 1, torch.float32),
    Case("tower", "waveclip-vit-b-16-448", 1, torch.float32),
)
GPU_CASES = (
    Case("attention", "waveclip-vit-b-16", 128, torch.bfloat16),
    Case("attention", "waveclip-vit-b-16-448", 32, torch.bfloat16),
    Case("attention", "waveclip-vit-b-16-448", 32, torch.bfloat16, stage_tokens=394),
    Case("tower", "waveclip-vit-b-16", 64, torch.bfloat16),
    Case("tower", "waveclip-vit-b-16-448", 16, torch.bfloat16),
)
QUICK_CASES = (Case("attention", "waveclip-tiny", 2, torch.float32), Case("tower", "waveclip-tiny", 2, torch.float32))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, as seen by the dispatcher (CPU memory proxy)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(step, device: torch.device) -> int:
    """Extra memory one call of `step()` needs at its peak (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as mode:
        step()
    return mode.peak


def attention_providers(block_sizes: list[int], device: torch.device) -> list[dict]:
    """[{provider, backend, attend | status, note}] where attend(q, k, v) -> out is differentiable."""
    mask = ref.block_causal_mask(block_sizes, device)

    def ours(impl, q, k, v):
        return wk.block_causal_attention(q, k, v, block_sizes, impl=impl)

    out = []
    for p in common.impl_providers("block_causal_attention", device, lambda impl: impl):
        if "fn" in p:
            p = {**p, "attend": functools.partial(ours, p["backend"])}
        out.append({k: v for k, v in p.items() if k != "fn"})
    out.append(
        {
            "provider": "sdpa_mask",
            "backend": "auto",
            "attend": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "note": "boolean block-causal mask, PyTorch's choice of backend",
        }
    )
    out.append(
        {
            "provider": "flex_compiled",
            "backend": f"flex/inductor-{device.type}",
            "attend": lambda q, k, v: _compiled_flex()(
                q, k, v, block_mask=_block_mask(tuple(block_sizes), str(device))
            ),
            "note": "torch.compile(flex_attention), cached BlockMask",
        }
    )
    out.append(
        {
            "provider": "sdpa_per_stage",
            "backend": "auto",
            "attend": lambda q, k, v: per_stage_sdpa(q, k, v, block_sizes),
            "note": "one SDPA per stage over its prefix, autograd",
        }
    )
    return out


def _attention_step(case: Case, device: torch.device):
    """(make_step(attend) -> step, flops of one forward) for the op alone."""
    cfg = case.config()
    shape = (case.batch, cfg.heads, sum(case.block_sizes), cfg.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=case.dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=case.dtype)

    def make_step(attend):
        def step():
            for t in (q, k, v):
                t.grad = None
            attend(q, k, v).backward(grad)

        return step

    return make_step, block_causal_flops(case.batch, cfg.heads, cfg.head_dim, case.block_sizes)


def _tower_step(case: Case, device: torch.device):
    """(make_step(attend) -> step, None) for a whole WaveCLIP forward + backward."""
    cfg = case.config()
    torch.manual_seed(0)
    model = WaveCLIP(cfg).to(device=device, dtype=case.dtype).train()
    images = torch.randn(case.batch, 3, *cfg.image_size, device=device, dtype=case.dtype)
    tokens = [t.detach() for t in model.tokenize(images)]
    weights = torch.linspace(-1, 1, cfg.embed_dim, device=device, dtype=case.dtype)

    def make_step(attend):
        def step():
            model.zero_grad(set_to_none=True)
            x = torch.cat([model.embed_stage(s, t) for s, t in enumerate(tokens)], dim=1)
            x = model.ln_pre(x)
            for block in model.transformer.resblocks:
                x = block(x, attend)
            cls = [sum(cfg.block_sizes[:s]) for s in range(len(cfg.block_sizes))]
            (model.exit(x[:, cls]) * weights).sum().backward()

        return step

    return make_step, None


def run_case(case: Case, device: torch.device, budget_s: float, flex: bool) -> list[dict]:
    make_step, flops = (_attention_step if case.kind == "attention" else _tower_step)(case, device)
    rows = []
    for p in attention_providers(case.block_sizes, device):
        row = {"bench": "training_step", "case": case.name, "kind": case.kind, "preset": case.preset}
        row |= {"batch": case.batch, "tokens": sum(case.block_sizes), "dtype": common.dtype_name(case.dtype)}
        row |= {"provider": p["provider"], "backend": p["backend"], "status": p.get("status", "ok")}
        row |= {"note": p.get("note", "")}
        if p["provider"] == "flex_compiled" and not flex:
            rows.append(row | {"status": "skipped", "note": "in quick mode (compiling takes tens of seconds)"})
            continue
        if "attend" not in p:
            rows.append(row)
            continue
        step = make_step(p["attend"])
        try:
            step()  # compile, autotune, warm the allocator
            memory = peak_bytes(step, device)
            timing = common.time_fn(step, device, warmup=1, min_reps=3, budget_s=budget_s)
        except Exception as err:  # a provider that fails is a result: report it, run the others
            rows.append(row | {"status": "error", "note": common.first_line(err)})
            continue
        row |= {"ms": timing.ms, "ms_min": timing.ms_min, "cpu_ms": timing.cpu_ms, "reps": timing.reps}
        row |= {"peak_mb": memory / 2**20}
        if flops is not None:
            row |= {"gflop": 3.5 * flops / 1e9} | common.rates(timing.ms, 3.5 * flops)
        rows.append(row)
    return rows


def run(out_dir=common.DEFAULT_OUT, device="cpu", cases=None, quick: bool = False, budget_s: float = 2.0) -> list:
    """Every case and provider; writes training.csv and training.png into `out_dir`."""
    device = torch.device(device)
    if quick:
        budget_s = min(budget_s, 0.05)
    if cases is None:
        cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    rows = []
    out_dir = pathlib.Path(out_dir)
    for case in cases:
        rows += run_case(case, device, budget_s, flex=not quick)
        common.write_csv(out_dir / "training.csv", rows, device)  # row by row: a timeout keeps what ran
    title = f"training step (forward + backward), {common.device_name(device)}"
    common.plot_cases(out_dir / "training.png", rows, title)
    return rows


COLUMNS = ["case", "provider", "backend", "status", "ms", "peak_mb", "tflops", "note"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for training.csv and training.png")
    parser.add_argument("--kind", choices=["attention", "tower", "all"], default="all")
    parser.add_argument("--budget-s", type=float, default=2.0, help="timed repetitions per provider (seconds)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, no FlexAttention compile (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    cases = [c for c in cases if args.kind in ("all", c.kind)]
    rows = run(args.out, device, cases, args.quick, args.budget_s)
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
