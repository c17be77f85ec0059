"""Every ```python block of README.md runs as pasted, each in a fresh namespace and an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def snippets() -> list:
    """pytest params of (first line number, code), with the section heading as the id."""
    text = README.read_text()
    params = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        line = text.count("\n", 0, match.start()) + 2
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        name = f"{headings[-1] if headings else 'top'} (line {line})".replace(" ", "-")
        params.append(pytest.param(line, match.group(1), id=name))
    return params


SNIPPETS = snippets()


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2, "README.md lost its ```python examples"


@pytest.mark.parametrize("line,code", SNIPPETS)
def test_readme_snippet_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (checkpoints)
    exec(compile(code, f"{README}:{line}", "exec"), {"__name__": "__readme__"})
