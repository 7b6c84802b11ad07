"""The product's layout: every module imports on its own, no import circle, no file over 500 lines, and
stage2_decoder's wings (training/ decoding/ serving/ sweeps/ reporting/) below thin entry points."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "stage1_extract", "stage2_decoder")
MAX_LINES = 500
ENTRY_POINTS = ("train", "caption", "evaluate", "sweep", "serve", "export", "report", "plot", "samples")
WINGS = ("training", "decoding", "serving", "sweeps", "reporting")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every product module, wings included."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imported(path: Path, top_level_only: bool) -> set[str]:
    """The product modules `path` imports (at module level, `if TYPE_CHECKING:` blocks included, or anywhere)."""
    tree = ast.parse(path.read_text())
    if top_level_only:
        nodes = [n for s in tree.body for n in ([s, *s.body] if _type_checking(s) else [s])]
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    mods = _modules()
    return {n for n in names if n in mods}


def _function_level_imports(path: Path):
    """(import statement, its source lines) for every import below the module level."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            top.update(map(id, node.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            yield node


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


def test_module_discovery_covers_the_wings():
    mods = _modules()
    for wing in WINGS:
        assert f"stage2_decoder.{wing}" in mods
        assert any(m.startswith(f"stage2_decoder.{wing}.") for m in mods), wing


def test_every_product_module_imports_first_in_a_fresh_interpreter():
    names = sorted(_modules())
    p = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=REPO, capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {}


def test_no_import_circle_among_product_modules_not_even_behind_type_checking():
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
    assert not [m for m in imported if m.startswith(("stage2_decoder.sweep", "stage2_decoder.sweeps"))]


def test_no_product_file_is_over_500_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}


def test_wings_never_import_an_entry_point():
    entry = {f"stage2_decoder.{e}" for e in ENTRY_POINTS}
    found = {}
    for name, path in _modules().items():
        if name.split(".")[:2][-1] in WINGS:
            bad = _imported(path, top_level_only=False) & entry
            if bad:
                found[name] = sorted(bad)
    assert found == {}


def test_training_imports_neither_serving_nor_sweeps_nor_the_api():
    found = {}
    for name, path in _modules().items():
        if name.startswith("stage2_decoder.training"):
            bad = {m for m in _imported(path, top_level_only=False)
                   if m.startswith(("stage2_decoder.serving", "stage2_decoder.sweeps")) or m == "stage2_decoder.api"}
            if bad:
                found[name] = sorted(bad)
    assert found == {}


def test_validation_evaluate_and_the_api_share_one_decoding_function():
    shared = "stage2_decoder.decoding.captions"
    users = {"stage2_decoder.api", "stage2_decoder.training.epochs", "stage2_decoder.reporting.evaluation"}
    mods = _modules()
    assert {u for u in users if shared in _imported(mods[u], top_level_only=False)} == users


def _private_imports(paths) -> list[str]:
    mods = _modules()
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                found += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_from_another_file():
    paths = [*_modules().values(), *sorted((REPO / "tests").glob("*.py")), *sorted((REPO / "bench").glob("*.py"))]
    assert _private_imports(paths) == []


def test_tests_import_names_from_the_module_that_defines_them():
    mods = _modules()
    defined = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        names = set()
        for s in tree.body:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(s.name)
            elif isinstance(s, (ast.Assign, ast.AnnAssign)):
                targets = s.targets if isinstance(s, ast.Assign) else [s.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        defined[name] = names
    lazy = {("stage2_decoder", "Captioner")}  # the package's documented API, bound on first use
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name not in defined[node.module] and f"{node.module}.{a.name}" not in mods
                          and (node.module, a.name) not in lazy]
    assert found == []


def test_function_level_imports_of_product_modules_say_why():
    mods = _modules()
    bare = []
    for name, path in mods.items():
        if not name.startswith("stage2_decoder"):
            continue
        lines = path.read_text().splitlines()
        for node in _function_level_imports(path):
            targets = {node.module} if isinstance(node, ast.ImportFrom) else {a.name for a in node.names}
            if not targets & set(mods):
                continue
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            own = "#" in lines[node.end_lineno - 1]
            if not (own or above.startswith("#")):
                bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bare == []


def test_each_wing_says_what_it_does_and_which_file_to_open_first():
    for wing in WINGS:
        init = REPO / "stage2_decoder" / wing / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, wing
        assert 2 <= len(doc.splitlines()) <= 3, wing
        assert "Open " in doc, wing
        first = doc.split("Open ", 1)[1].split()[0]
        assert (init.parent / first).is_file(), f"{wing}: {first}"


def test_entry_points_stay_at_the_top_level():
    for e in ENTRY_POINTS:
        assert (REPO / "stage2_decoder" / f"{e}.py").is_file(), e
