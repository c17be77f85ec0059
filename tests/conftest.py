"""Shared fixtures: seeding, guard-banded buffers, KV-append cases, the tiny tower and the tiny teacher.

Without a GPU, Triton's kernels run on CPU tensors under its interpreter. TRITON_INTERPRET is read
when a @triton.jit kernel is defined, so it is set here, before the test modules import the kernels
(importing torch does not import Triton). On a CUDA machine it is left alone, so the GPU tests run
compiled kernels; set TRITON_INTERPRET=1 yourself to force the interpreter there.

Hypothesis runs under the profile named by HYPOTHESIS_PROFILE: "ci" (default: few examples, a
deadline, no example database) or "thorough" (many more examples, for a local search).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
import torch
from helpers import SENTINEL, guarded
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=10_000,  # ms per example: catches a pathological case, not the noise of a shared machine
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh, reproducible random inputs for each test."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny ops: on a busy 2-core machine, waking a second
    thread costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ guard bands


class GuardBands:
    """Views into sentinel-filled buffers; `check()` says whether any write landed outside a view."""

    def __init__(self):
        self._made: list[tuple[torch.Tensor, torch.Tensor]] = []

    def new(self, shape, dtype, dim: int = 0, pad: int = 3, device="cpu") -> torch.Tensor:
        """A (shape) view whose neighbours along `dim` (`pad` each side) hold the sentinel."""
        view, buffer, mask = guarded(shape, dtype, dim=dim, pad=pad)
        if torch.device(device).type != "cpu":
            buffer = buffer.to(device)
            view = buffer.as_strided(view.shape, view.stride(), view.storage_offset())
        self._made.append((buffer, mask.to(buffer.device)))
        return view

    def check(self) -> None:
        for buffer, mask in self._made:
            sentinel = torch.tensor(SENTINEL, dtype=buffer.dtype, device=buffer.device)
            assert (buffer[~mask] == sentinel).all(), "a write landed outside the target"


@pytest.fixture
def guards():
    """Make guarded views with `guards.new(shape, dtype, dim)`; every band is checked again at teardown."""
    bands = GuardBands()
    yield bands
    bands.check()


# ------------------------------------------------------------------------------- dispatch spies


class Ran:
    """What ran, by backend: `extension` (names of `_C` functions), `triton` (kernel names), `reference` (ops)."""

    def __init__(self):
        self.extension: list[str] = []
        self.triton: list[str] = []
        self.reference: list[str] = []

    def backends(self) -> set[str]:
        return {name for name in ("extension", "triton", "reference") if getattr(self, name)}


def _spy(log: list, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        log.append(name)
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def ran(monkeypatch) -> Ran:
    """Spies on every `_C` function, every Triton launch and the reference ops while the test runs."""
    from waveclip_kernels import OPS, extension
    from waveclip_kernels import reference as ref

    record = Ran()
    ext = extension.load()
    if not isinstance(ext, ImportError):
        for name in dir(ext):
            fn = getattr(ext, name)
            if not name.startswith("_") and callable(fn) and name != "has_cuda":
                monkeypatch.setattr(ext, name, _spy(record.extension, name, fn))
    for op in OPS:
        monkeypatch.setattr(ref, op, _spy(record.reference, op, getattr(ref, op)))
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return record
    for cls in (InterpretedFunction, JITFunction):
        launch = cls.run

        def run(self, *args, _launch=launch, **kwargs):
            record.triton.append(self.fn.__name__)
            return _launch(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return record


# ------------------------------------------------------------------------------ KV-append cases


@dataclass
class KVCase:
    """Inputs of one `attention_with_kv_append` call, with what it must write and return."""

    q: torch.Tensor  # (B, H, n, D)
    k_new: torch.Tensor  # (B, H, n, D)
    v_new: torch.Tensor  # (B, H, n, D)
    k_cache: torch.Tensor  # (B_cache, H, N_max, D), a guarded view
    v_cache: torch.Tensor
    lens: list[int]  # cache_lens before the append
    batch_index: list[int] | None  # cache row of each query row (None: row b)
    k_before: torch.Tensor  # the caches as built, before any append
    v_before: torch.Tensor

    @property
    def rows(self) -> list[int]:
        return list(range(len(self.lens))) if self.batch_index is None else list(self.batch_index)

    def cache_lens(self, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(self.lens, dtype=dtype, device=self.q.device)

    def index(self, dtype=torch.int64) -> torch.Tensor | None:
        return None if self.batch_index is None else torch.tensor(self.batch_index, dtype=dtype, device=self.q.device)

    def args(self, lens_dtype=torch.int64) -> tuple:
        """(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index) for the op."""
        lens, index = self.cache_lens(lens_dtype), self.index(lens_dtype)
        return self.q, self.k_new, self.v_new, self.k_cache, self.v_cache, lens, index

    def expected_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches after the append: k_new/v_new at [c, c+n) of each routed row, the rest as built."""
        k, v = self.k_before.clone(), self.v_before.clone()
        n = self.q.shape[2]
        for b, (r, c) in enumerate(zip(self.rows, self.lens)):
            k[r, :, c : c + n] = self.k_new[b]
            v[r, :, c : c + n] = self.v_new[b]
        return k, v

    def oracle(self, scale=None, dtype=None) -> torch.Tensor:
        """torch.cat of each row's prefix and the new keys, then SDPA, row by row (in `dtype` if given)."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out = []
        for b, (r, c) in enumerate(zip(self.rows, self.lens)):
            k = torch.cat([self.k_before[r, :, :c], self.k_new[b]], dim=1)
            v = torch.cat([self.v_before[r, :, :c], self.v_new[b]], dim=1)
            out.append(torch.nn.functional.scaled_dot_product_attention(cast(self.q[b]), cast(k), cast(v), scale=scale))
        return torch.stack(out) if out else torch.empty(self.q.shape, dtype=dtype or self.q.dtype)

    def assert_caches_written(self) -> None:
        """Appended slots are bit-exact copies; every other element (NaN included) is unchanged."""
        k, v = self.expected_caches()
        torch.testing.assert_close(self.k_cache, k, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(self.v_cache, v, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def kv_case(guards):
    """Factory of `KVCase`s with guarded caches (checked at teardown).

    `kv_case(B, H, n, D, B_cache, n_max, lens, batch_index=None, dtype=float64, nan_tail=False)`; with
    `nan_tail` the never-written slots past max(lens) + n hold NaN, so reading past a row's end poisons
    the output.
    """

    def build(
        B, H, n, D, B_cache, n_max, lens, batch_index=None, dtype=torch.float64, nan_tail=False, device="cpu"
    ) -> KVCase:
        q, k_new, v_new = (torch.randn(B, H, n, D, dtype=torch.float64).to(dtype).to(device) for _ in range(3))
        caches = []
        for _ in range(2):
            cache = guards.new((B_cache, H, n_max, D), dtype, dim=2, device=device)
            cache.copy_(torch.randn(B_cache, H, n_max, D, dtype=torch.float64))
            if nan_tail:
                cache[:, :, max(lens, default=0) + n :] = float("nan")
            caches.append(cache)
        k_cache, v_cache = caches
        return KVCase(q, k_new, v_new, k_cache, v_cache, list(lens), batch_index, k_cache.clone(), v_cache.clone())

    return build


# ------------------------------------------------------------------------- tiny tower and teacher


def _tiny_tower(dtype=torch.float32, impl="auto", **overrides):
    from waveclip import WaveCLIP, WaveCLIPConfig

    config = WaveCLIPConfig.from_preset("waveclip-tiny", **overrides)
    model = WaveCLIP(config, impl=impl).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_tower():
    """Factory `tiny_tower(dtype=float32, impl="auto", **config_overrides)`: the waveclip-tiny preset
    (32 px, L=2, 2x2 grid, width 32, 2 layers) with every parameter perturbed, so that nothing relies on
    zeros or ones."""
    return _tiny_tower


def _tiny_teacher(dtype=torch.float64, quick_gelu=True, seed=0):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from waveclip import WaveCLIPConfig

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    embed_dim = WaveCLIPConfig.from_preset("waveclip-tiny").embed_dim
    model = open_clip.CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    with torch.no_grad():  # open_clip zero-initialises biases and LayerNorms are identity: make them count
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture
def tiny_teacher():
    """Factory `tiny_teacher(dtype=float64, quick_gelu=True, seed=0)`: a random open_clip CLIP whose vision
    tower matches the tiny preset (32 px, 8 px patches, width 32)."""
    return _tiny_teacher


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for parametrized cases: dtypes by name, shapes and sizes as 3x5 / 7-33-1."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
        return ("x" if isinstance(val, tuple) else "-").join(map(str, val))
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}[{','.join(map(str, val.shape))}]"
    if isinstance(val, dict) and val:
        return "+".join(val)
    return None
