"""Fixtures of the command-line tests: an in-process runner, small real photographs, tiny checkpoints."""

import json
import re

import pytest
import torch
from PIL import Image

from waveclip.config import WaveCLIPConfig
from waveclip_cli.main import main

TINY_TEACHER = "waveclip-test-tiny-teacher"  # an open_clip model config registered by `tiny_teacher_checkpoint`


class Cli:
    """Runs `waveclip ARGS...` in this process and returns (exit status, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *argv):
        code = main([str(a) for a in argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def error(self, pattern, *argv) -> str:
        """Run a command that must fail with exactly one `waveclip ...: error:` line matching `pattern`."""
        code, out, err = self(*argv)
        assert code == 1, (out, err)
        lines = [line for line in err.splitlines() if line.startswith("waveclip")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), err
        assert "Traceback" not in err
        return lines[0]


@pytest.fixture
def cli(capsys):
    return Cli(capsys)


@pytest.fixture
def photo(tmp_path):
    """A real photograph (scikit-image's astronaut) saved as PNG, plus a small second one."""
    import skimage.data

    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).resize((96, 96)).save(path)
    small = tmp_path / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).resize((120, 80)).save(small)
    return path, small


@pytest.fixture
def photo_folder(tmp_path):
    """A folder of real photographs in nested sub-folders, with a file that is not an image."""
    import skimage.data

    root = tmp_path / "photos"
    files = ("a/chelsea.png", "a/b/rocket.jpg", "a/b/camera.png", "coffee.png", "astronaut.bmp")
    for rel in files:
        name = rel.rsplit("/", 1)[-1].split(".")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).resize((48, 40)).save(root / rel)
    (root / "a" / "notes.md").write_text("not an image")
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from waveclip import WaveCLIP

    torch.manual_seed(0)
    directory = tmp_path / "tiny"
    WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_teacher_checkpoint(tmp_path):
    """A tiny tower initialised from a tiny open_clip CLIP, whose config names that teacher: `classify`
    builds the teacher's text tower again, with random weights."""
    import open_clip

    from waveclip import WaveCLIP

    spec = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    spec_path = tmp_path / f"{TINY_TEACHER}.json"
    spec_path.write_text(json.dumps(spec))
    open_clip.add_model_config(spec_path)
    teacher = open_clip.create_model(TINY_TEACHER, force_quick_gelu=True)
    config = WaveCLIPConfig.from_preset("waveclip-tiny", teacher=TINY_TEACHER)
    directory = tmp_path / "tiny-with-teacher"
    WaveCLIP.from_open_clip(teacher, config, impl="reference").save_pretrained(directory)
    return directory
