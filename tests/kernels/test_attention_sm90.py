"""The Triton attention kernels through Triton's full GPU pipeline (sm_90 cubins), without a GPU.

What a GPU would reject and the interpreter accepts: shared memory over the per-block limit, a
float64 kernel that computes in float32 somewhere (a Python float argument is typed fp32 when
compiled), masked loads that leave lanes undefined, the wrong fp32 dot precision. The compiles go
through `bench.compile_sweep` (the same machinery as `make compile-sweep`): every config the pruning
keeps, or the one with the largest shared-memory estimate, under a stand-in sm_90 driver, with
`kernel.metadata.shared`, ptxas's registers and spills and what the Triton IR says, per kernel and
config. Cold compiles take seconds per config (fp32 tens): these tests are slow.
"""

from __future__ import annotations

import pytest
import torch

from bench import compile_sweep
from waveclip_kernels.triton import attention as tri_attention

ATTENTION_WORKLOADS = ("block_causal", "block_causal_backward", "kv_append", "kv_append_split")
ATTENTION_KERNELS = {
    "_block_causal_fwd_kernel",
    "_bwd_preprocess_kernel",
    "_bwd_dkdv_kernel",
    "_bwd_dq_kernel",
    "_attn_kv_append_kernel",
    "_combine_splits_kernel",
}
MATMUL = {"ieee": "highest", "tf32x3": "high", "tf32": "medium"}  # dot precision -> torch's setting


def compile_sm90(dtype: str, head_dim: int, workloads=ATTENTION_WORKLOADS, precision: str | None = None) -> list:
    """Rows of `bench.compile_sweep` (largest kept config per autotuned launch) at one dtype and head
    dim; every row must have compiled within the sweep's rules."""
    tasks = [(w, dtype, head_dim) for w in workloads]
    precisions = [MATMUL[precision]] if precision else None
    rows = list(compile_sweep.compile_rows(tasks, jobs=2, pick="largest", precisions=precisions, timeout_s=900))
    bad = [r for r in rows if r["verdict"] != "ok"]
    assert rows and not bad, bad
    return rows


def tile(row: dict) -> dict:
    """A row's config text ("BLOCK_M=64 BLOCK_N=32 warps=4 stages=2") as ints."""
    return {k: int(v) for k, v in (part.split("=") for part in row["config"].split())}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,head_dim", [("bfloat16", 128), ("float64", 128), ("float64", 80)])
def test_kept_configs_fit_shared_memory_and_stay_fp64(dtype, head_dim):
    """The largest kept config of every attention kernel needs no more shared memory than the
    estimate and the sm_90 limit; fp64 kernels carry an fp64 scale and no f32 anywhere; no masked
    load leaves lanes undefined."""
    rows = compile_sm90(dtype, head_dim)
    assert {r["kernel"] for r in rows} == ATTENTION_KERNELS
    tuned = [r for r in rows if r["kernel"] in compile_sweep.ESTIMATED]
    assert len(tuned) == 5  # one config per autotuned launch: forward, dK/dV, dQ, KV append twice
    for r in rows:
        assert r["loads_without_other"] == 0, r
        assert r["shared_bytes"] <= tri_attention.SHARED_MEMORY_LIMIT, r
        if dtype == "float64":
            assert not r["ttir_f32"], f"{r['kernel']} computes in f32 somewhere"
            if r["scale_type"]:
                assert r["scale_type"] == "*fp64", r
    for r in tuned:
        c = tile(r)
        family = compile_sweep.ESTIMATED[r["kernel"]]
        estimate = tri_attention.shared_memory_estimate(
            family, getattr(torch, dtype), head_dim, c["BLOCK_M"], c["BLOCK_N"], c["stages"]
        )
        assert r["shared_bytes"] <= estimate <= tri_attention.SHARED_MEMORY_LIMIT, r


@pytest.mark.slow
@pytest.mark.parametrize("precision,max_spill", [("ieee", 256), ("tf32x3", 0)])
def test_fp32_forward_follows_matmul_precision_and_spill_budget(precision, max_spill):
    """fp32 forward at head dim 64: the dots take the precision torch asks for; the tensor-core path
    spills nothing, the IEEE (CUDA-core) path at most `max_spill` bytes (it spilled KBs at 64 x 64)."""
    rows = compile_sm90("float32", 64, workloads=["block_causal"], precision=precision)
    (record,) = [r for r in rows if r["kernel"] == "_block_causal_fwd_kernel"]
    assert record["fp32_precision"] == MATMUL[precision]
    # TTIR prints a dot's inputPrecision only when it is not the default, IEEE
    assert record["dot_precisions"] == ("" if precision == "ieee" else precision)
    print(f"fp32 {precision} forward {record['config']}: {record['registers']} registers,", record["spill_stores"], "B")
    assert record["spill_stores"] <= max_spill, record


# --------------------------------------------------------------- host-side rules, no compile


@pytest.mark.parametrize("kernel", tri_attention.KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
def test_every_kept_config_fits_the_estimate(kernel, dtype, head_dim):
    precisions = ["ieee", "tf32x3", "tf32"] if dtype == torch.float32 else ["ieee"]
    for precision in precisions:
        configs = tri_attention.attention_configs(kernel, dtype, head_dim, precision)
        assert configs
        for c in configs:
            estimate = tri_attention.shared_memory_estimate(
                kernel, dtype, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            )
            assert estimate <= tri_attention.SHARED_MEMORY_LIMIT
            assert min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 16  # the smallest GPU dot
            if dtype in (torch.float16, torch.bfloat16):
                registers = tri_attention.register_estimate(
                    kernel, dtype, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
                )
                assert registers <= tri_attention.HALF_REGISTER_BUDGET
        if precision == "ieee" and dtype == torch.float32:
            assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 64 * 64 for c in configs)


def test_half_configs_that_spilled_are_rejected():
    """The bf16/fp16 configs that spilled at head dim 80 and 128 on sm_90 (make compile-sweep) are
    pruned there and kept at head dim 64, where they did not spill."""
    spilled = {"backward_dkdv": (64, 64, 4, 2), "kv_append": (128, 32, 4, 3)}
    for kernel, config in spilled.items():
        for dtype in (torch.float16, torch.bfloat16):
            for head_dim, kept in ((64, True), (80, False), (128, False)):
                configs = tri_attention.attention_configs(kernel, dtype, head_dim)
                found = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
                assert (config in found) == kept, (kernel, dtype, head_dim)


def test_former_fp64_configs_are_rejected():
    """The fp64 forward configs that needed 352 KB / 272 KB at head dim 128 are pruned."""
    kept = {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)
        for c in tri_attention.attention_configs("forward", torch.float64, 128)
    }
    assert (64, 64, 3) not in kept and (64, 32, 4) not in kept
    for m, n, stages in ((64, 64, 3), (64, 32, 4)):
        estimate = tri_attention.shared_memory_estimate("forward", torch.float64, 128, m, n, stages)
        assert estimate > tri_attention.SHARED_MEMORY_LIMIT


@pytest.mark.parametrize(
    "setting,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")], ids=["highest", "high", "medium"]
)
def test_fp32_dot_precision_follows_torch(setting, expected, monkeypatch):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert tri_attention.dot_precision(torch.float32) == expected
        assert tri_attention.dot_precision(torch.bfloat16) == "ieee"
        assert tri_attention.dot_precision(torch.float64) == "ieee"
        seen = []
        monkeypatch.setattr(tri_attention, "_launch", lambda kernel, tuned, name, grid, args, meta: seen.append(meta))
        q = torch.randn(1, 1, 4, 16)
        tri_attention.block_causal_attention(q, q, q, [4], 0.25)
        assert seen[0]["DOT_PRECISION"] == expected
    finally:
        torch.set_float32_matmul_precision(old)


def test_fp64_scale_reaches_the_kernels_in_fp64():
    scales = tri_attention._scales(0.1, torch.float64, torch.device("cpu"))
    assert scales.dtype == torch.float64 and scales[1].item() == 0.1
    assert tri_attention._scales(0.1, torch.bfloat16, torch.device("cpu")).dtype == torch.float32


def test_launchers_enter_the_tensors_device(monkeypatch):
    guard = tri_attention.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []

    def recording_guard(device):
        entered.append(device)
        return tri_attention.contextlib.nullcontext()

    monkeypatch.setattr(tri_attention, "device_guard", recording_guard)
    monkeypatch.setattr(tri_attention, "_launch", lambda *args: None)
    q = torch.randn(1, 1, 4, 16)
    out, lse = tri_attention.block_causal_attention_forward(q, q, q, [4], 0.25)
    tri_attention.block_causal_attention_backward(q, q, q, q, out, lse, [4], 0.25)
    cache = torch.randn(1, 1, 8, 16)
    tri_attention.attention_with_kv_append(q, q, q, cache, cache.clone(), torch.tensor([0]), None, 0.25)
    assert entered == [q.device] * 3
