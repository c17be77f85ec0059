"""The README's model snippet runs as pasted (offline, random weights)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '## {title}'"
    return blocks[0]


def test_the_model_snippet_runs_as_pasted(tmp_path, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    pytest.importorskip("skimage")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(section_code("The model"), str(README), "exec"), scope)
    assert scope["exits"].shape == (2, 3, 16) and scope["half"].shape == (2, 2, 16)
    assert (scope["half"] - scope["exits"][:, :2]).abs().max() < 1e-5
    assert len(capsys.readouterr().out.splitlines()) == 2 and (tmp_path / "ckpt" / "config.json").is_file()
