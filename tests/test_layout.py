"""The product's layout: every module imports on its own, no import circle, no file over 500 lines."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "stage1_extract", "stage2_decoder")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every product module."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def _imported(path: Path, top_level_only: bool) -> set[str]:
    """The product modules `path` imports (at module level only, or anywhere in the file)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    mods = _modules()
    return {n for n in names if n in mods}


# each module imported first, in a fork of one interpreter that has loaded only third-party libraries: a
# circle that breaks depending on which module comes first shows up as that module's ImportError
_IMPORT_EACH = """
import importlib, json, os, sys
import click, h5py, numpy, torch, torchvision, tqdm  # noqa: F401 - shared by the forks, imported once
failed = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}".encode()[:2000])
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        why = f.read().decode()
    if os.waitpid(pid, 0)[1] != 0:
        failed[name] = why or "the import killed the process"
print(json.dumps(failed))
"""


def test_every_product_module_imports_first_in_a_fresh_interpreter():
    names = sorted(_modules())
    p = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=REPO, capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {}


def test_no_import_circle_among_product_modules():
    graph = {name: _imported(path, top_level_only=True) - {name} for name, path in _modules().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return path + [name, dep]
            if dep not in state and (circle := visit(dep, path + [name])):
                return circle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name, [])
            assert circle is None, " -> ".join(circle[circle.index(circle[-1]):])


def test_plot_imports_no_sweep_module():
    imported = _imported(REPO / "stage2_decoder" / "plot.py", top_level_only=False)
    assert not [m for m in imported if m.startswith("stage2_decoder.sweep")]


def test_no_product_file_is_over_500_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}
