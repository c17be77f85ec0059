"""`waveclip` runs inference without open_clip, fvcore or PyWavelets: import, forward, start/refine, the
gate and a checkpoint round trip, in a fresh interpreter where importing those packages fails."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCKED = ("open_clip", "fvcore", "pywt")

SITECUSTOMIZE = f"""
import sys


class Blocker:
    BLOCKED = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{{name}} is blocked for this test")
        return None


sys.meta_path.insert(0, Blocker())
"""

SCRIPT = """
import sys, tempfile
import torch
import waveclip
from waveclip import WaveCLIP, WaveCLIPConfig, ZeroShotClassifier

try:
    import open_clip  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker did not block open_clip")

torch.manual_seed(0)
model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    full = model(x)
state = model.start(x)
model.refine(state, active=[1])
model.refine(state)
torch.testing.assert_close(state.embeddings[1], full[1], rtol=0, atol=1e-5)
clf = ZeroShotClassifier(model, torch.randn(3, 16), ["a", "b", "c"], thresholds=(0.9, 0.9))
assert len(clf.predict(x)) == 2
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = WaveCLIP.from_pretrained(folder, impl="reference")
with torch.no_grad():
    assert torch.equal(loaded(x), full)
try:
    waveclip.create_model_and_transforms("waveclip-tiny")
except ImportError as err:
    assert "open_clip" in str(err), err
else:
    raise SystemExit("create_model_and_transforms ran without open_clip")
loaded_blocked = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
assert not loaded_blocked, loaded_blocked
print("ok")
""".replace("{blocked!r}", repr(set(BLOCKED)))


def test_inference_runs_with_open_clip_fvcore_and_pywt_blocked(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
