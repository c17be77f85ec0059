"""The import graph of the installed packages: no cycle, and no module imports a package above its own.

Order: waveclip_kernels < waveclip < waveclip_train < waveclip_cli; bench sits beside waveclip_train: it may
import the first two, and the command line (`waveclip bench`, `waveclip flops`) may import it.
`waveclip/__main__.py` is the command-line entry script (`python -m waveclip`): nothing imports it, and
it is the one module allowed to import upwards. Every import statement counts, including those inside
functions (a lazy import is still a dependency) and relative ones.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("waveclip_kernels", "waveclip", "waveclip_train", "waveclip_cli", "bench")
RANK = {"waveclip_kernels": 0, "waveclip": 1, "waveclip_train": 2, "waveclip_cli": 3}
MAY_IMPORT = {name: {p for p, r in RANK.items() if r <= rank} for name, rank in RANK.items()}
MAY_IMPORT["bench"] = {"waveclip_kernels", "waveclip", "bench"}
MAY_IMPORT["waveclip_cli"].add("bench")
ENTRY_SCRIPTS = {"waveclip.__main__"}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """Project modules that the file at `path` (module `name`) imports, resolved to known module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a import b` needs module a.b when there is one, else the names a defines.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` depends on the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, name, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where the search met it)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        allowed = MAY_IMPORT[name.split(".")[0]]
        if name in ENTRY_SCRIPTS:
            continue
        bad += [f"{name} imports {t}" for t in sorted(targets) if t.split(".")[0] not in allowed]
    return bad


def test_the_packages_import_in_one_direction_without_cycles():
    graph = import_graph(ROOT)
    assert {"waveclip.model", "waveclip_kernels.api", "waveclip_cli.main", "bench.common"} <= set(graph)
    assert "waveclip.config" in graph["waveclip.model"]  # relative imports are resolved
    assert "waveclip_kernels.common" in graph["waveclip.config"]
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def plant(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "files, problem",
    [
        ({"waveclip/model.py": "def f():\n    from waveclip_train import distill\n"}, "upward"),
        ({"waveclip_kernels/api.py": "import waveclip.config\n"}, "upward"),
        ({"bench/run.py": "from waveclip_cli.main import main\n"}, "upward"),
        ({"waveclip/model.py": "from .interop import x\n", "waveclip/interop.py": "from . import model\n"}, "cycle"),
        ({"waveclip_train/a.py": "from .b import y\n", "waveclip_train/b.py": "import waveclip_train.a"}, "cycle"),
    ],
)
def test_a_planted_bad_import_is_found(tmp_path, files, problem):
    base = {f"{p}/__init__.py": "" for p in PACKAGES}
    plant(tmp_path, base | {"waveclip/__main__.py": "from waveclip_cli.main import main\n"})
    graph = import_graph(tmp_path)
    assert cycles(graph) == [] and upward_imports(graph) == []  # the entry script alone is allowed
    plant(tmp_path, files)
    graph = import_graph(tmp_path)
    assert (upward_imports(graph) if problem == "upward" else cycles(graph)) != []
