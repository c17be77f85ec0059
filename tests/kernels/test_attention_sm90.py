"""The Triton attention kernels through Triton's full GPU pipeline (sm_90 cubins), without a GPU.

What a GPU would reject and the interpreter accepts: shared memory over the per-block limit, a
float64 kernel that computes in float32 somewhere (a Python float argument is typed fp32 when
compiled), masked loads that leave lanes undefined, the wrong fp32 dot precision. `COMPILE` compiles
every config the pruning keeps (or the one with the largest estimate) under a fake sm_90 driver and
reports, per kernel and config: `kernel.metadata.shared`, the argument signature, whether the TTIR
mentions f32, its masked loads without `other`, the dot input precisions and, on request, ptxas's
register and spill counts. Cold compiles take seconds per config (fp32 tens): these tests are slow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from waveclip_kernels.triton import attention as tri_attention

COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


class H200:  # what the launch path asks of a driver, for an sm_90 target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(H200())
from waveclip_kernels.triton import attention as A

launch = JITFunction.run
records, state = [], {}


def masked_without_other(ttir):
    loads = [line.split("tt.load", 1)[1].split(" : ")[0] for line in ttir.splitlines() if "tt.load" in line]
    return sum(1 for operands in loads if len(operands.split(",")) == 2)


def ptxas_resources(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(map(int, spills))}


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    ttir = kernel.asm["ttir"]
    record = {
        "kernel": state["kernel"],
        "name": kernel.name,
        "dtype": state["dtype"],
        "head_dim": state["head_dim"],
        "precision": state["precision"],
        "config": {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in kwargs},
        "shared": kernel.metadata.shared,
        "signature": {k: str(v) for k, v in kernel.src.signature.items()},
        "ttir_f32": "f32" in ttir,
        "masked_loads_without_other": masked_without_other(ttir),
        "dot_precisions": sorted(set(re.findall(r"inputPrecision = (\w+)", ttir))),
    }
    if state["spills"]:
        record.update(ptxas_resources(kernel.asm["ptx"]))
    records.append(record)
    return kernel


def tuned(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs)
    if state["pick"] == "largest":
        def estimate(c):
            return A.shared_memory_estimate(state["kernel"], state["torch_dtype"], state["head_dim"],
                                            c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)
        configs = [max(configs, key=estimate)]
    for config in configs:
        self.fn.run(*args, **kwargs, **config.all_kwargs())


def named_launch(kernel, tuned_kernel, name, grid_of, args, meta):
    state["kernel"] = name
    if name in state["kernels"]:
        tuned_kernel[grid_of](*args, **meta)


JITFunction.run, Autotuner.run, A._launch = compile_only, tuned, named_launch
MATMUL = {"ieee": "highest", "tf32x3": "high", "tf32": "medium"}
for case in json.loads(sys.argv[1]):
    dtype = getattr(torch, case["dtype"])
    torch.set_float32_matmul_precision(MATMUL[case.get("precision", "ieee")])
    state.update(case, torch_dtype=dtype, precision=A.dot_precision(dtype), spills=case.get("spills", False))
    q = torch.randn(1, 2, 100, case["head_dim"], dtype=dtype)
    blocks = [25, 25, 50]
    out, lse = A.block_causal_attention_forward(q, q, q, blocks, 0.125)
    A.block_causal_attention_backward(q, q, q, q, out, lse, blocks, 0.125)
    cache = torch.randn(1, 2, 256, case["head_dim"], dtype=dtype)
    A.attention_with_kv_append(q, q, q, cache, cache.clone(), torch.tensor([5]), None, 0.125, num_splits=1)
print("RECORDS " + json.dumps(records))
"""

ALL_KERNELS = list(tri_attention.KERNELS)


def compile_sm90(cases: list[dict]) -> list[dict]:
    """Run COMPILE on `cases` ({dtype, head_dim, pick: "all"|"largest", kernels, precision?, spills?})."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(cases)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RECORDS "))
    return json.loads(line.removeprefix("RECORDS "))


@pytest.mark.slow
def test_kept_configs_fit_shared_memory_and_stay_fp64():
    """The largest kept config of every kernel, at head dim 128 (bf16, fp64) and 80 (fp64), needs no
    more shared memory than the estimate and the sm_90 limit; fp64 kernels carry an fp64 scale and no
    f32 anywhere; no masked load leaves lanes undefined."""
    cases = [
        {"dtype": "bfloat16", "head_dim": 128, "pick": "largest", "kernels": ALL_KERNELS},
        {"dtype": "float64", "head_dim": 128, "pick": "largest", "kernels": ALL_KERNELS},
        {"dtype": "float64", "head_dim": 80, "pick": "largest", "kernels": ALL_KERNELS},
    ]
    records = compile_sm90(cases)
    assert sorted({r["kernel"] for r in records}) == sorted(ALL_KERNELS)
    assert len([r for r in records if "BLOCK_N" in r["config"]]) == 3 * len(ALL_KERNELS)
    for r in records:
        c = r["config"]
        assert r["masked_loads_without_other"] == 0, r
        if "BLOCK_N" in c:
            dtype = getattr(torch, r["dtype"])
            estimate = tri_attention.shared_memory_estimate(
                r["kernel"], dtype, r["head_dim"], c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]
            )
            assert r["shared"] <= estimate <= tri_attention.SHARED_MEMORY_LIMIT, r
        if r["dtype"] == "float64":
            assert not r["ttir_f32"], f"{r['name']} computes in f32 somewhere"
            if "scale_ptr" in r["signature"]:
                assert r["signature"]["scale_ptr"] == "*fp64"


@pytest.mark.slow
@pytest.mark.parametrize("precision,max_spill", [("ieee", 256), ("tf32x3", 0)])
def test_fp32_forward_follows_matmul_precision_and_spill_budget(precision, max_spill):
    """fp32 forward at head dim 64: the dots take the precision torch asks for; the tensor-core path
    spills nothing, the IEEE (CUDA-core) path at most `max_spill` bytes (it spilled KBs at 64 x 64)."""
    case = {
        "dtype": "float32",
        "head_dim": 64,
        "pick": "largest",
        "kernels": ["forward"],
        "precision": precision,
        "spills": True,
    }
    (record,) = [r for r in compile_sm90([case]) if r["name"] == "_block_causal_fwd_kernel"]
    # TTIR prints a dot's inputPrecision only when it is not the default, IEEE
    assert record["dot_precisions"] == ([] if precision == "ieee" else [precision])
    print(
        f"fp32 {precision} forward {record['config']}:",
        f"{record['registers']} registers, {record['spill_bytes']} B spilled",
    )
    assert record["spill_bytes"] <= max_spill, record


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
        if precision == "ieee" and dtype == torch.float32:
            assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 64 * 64 for c in configs)


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
