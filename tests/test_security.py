"""Static security scan of the project's own Python files (Security).

- nothing is unpickled: every `torch.load` (and torchvision/torch.hub's `get_state_dict` /
  `load_state_dict_from_url`, which call `torch.load` underneath) passes `weights_only=True`; no
  `pickle`/`dill`/`joblib`/`marshal` loads, no `np.load(..., allow_pickle=True)`, no unsafe YAML;
- no shell: no `shell=True`, `os.system`, `os.popen`, `subprocess.getoutput`; no `eval`/`exec`.

The scan walks the syntax tree (so strings and comments never match, and `model.eval()` is not
`eval`), resolving import aliases (`import numpy as np`, `from torch import load`). The checker
is itself tested on sources that break each rule, so a scan that finds nothing means something.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"__pycache__", "runs", "cache", "build", "dist", "node_modules", "data"}  # data: downloads

# calls that unpickle whatever a file holds
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
              "cPickle.loads", "dill.load", "dill.loads", "joblib.load", "marshal.load", "marshal.loads",
              "pandas.read_pickle", "shelve.open", "torch.hub.load", "yaml.unsafe_load", "yaml.full_load"}
# calls that run torch.load and need weights_only=True
TORCH_LOADERS = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url",
                 "torch.utils.model_zoo.load_url"}
TORCH_LOADER_METHODS = {"get_state_dict", "load_state_dict_from_url"}  # WeightsEnum.get_state_dict(...)
SHELLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "commands.getoutput"}
SUBPROCESS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
              "subprocess.check_output", "asyncio.create_subprocess_shell"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module path, from the file's imports."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ".".join(reversed(parts))  # e.g. a call on a call's result: keep the attribute chain
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
        if k.arg is None:  # **kwargs: cannot be checked statically
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(src: str, name: str = "<src>") -> list[str]:
    """Every rule break in one file's source, as 'name:line: what'."""
    tree = ast.parse(src, filename=name)
    aliases = _aliases(tree)
    found = []

    def bad(node, what):
        found.append(f"{name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = _dotted(node.func, aliases)
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        if fn in UNPICKLERS:
            bad(node, f"{fn}() unpickles arbitrary objects")
        elif fn in TORCH_LOADERS or method in TORCH_LOADER_METHODS:
            if not _is_const(_kw(node, "weights_only"), True):
                bad(node, f"{fn}() without weights_only=True")
        elif fn in ("numpy.load", "np.load"):
            allow = _kw(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                bad(node, "numpy.load() with allow_pickle")
        elif fn == "yaml.load":
            loader = _kw(node, "Loader")
            if loader is None or _dotted(loader, aliases).split(".")[-1] not in SAFE_YAML_LOADERS:
                bad(node, "yaml.load() without a safe Loader")
        elif fn in SHELLS:
            bad(node, f"{fn}() runs a shell command")
        elif fn in SUBPROCESS:
            shell = _kw(node, "shell")
            if shell is not None and not _is_const(shell, False):
                bad(node, f"{fn}() with shell=")
            if fn == "asyncio.create_subprocess_shell":
                bad(node, f"{fn}() runs a shell command")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in aliases:
            bad(node, f"{node.func.id}() of a string")
    return found


def project_python_files() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        out += [Path(root) / f for f in sorted(files) if f.endswith(".py")]
    return out


def test_the_scan_covers_the_project():
    files = {str(p.relative_to(REPO)) for p in project_python_files()}
    for must in ("stage2_decoder/training/checkpoint.py", "common/backbones.py", "stage1_extract/extract.py",
                 "stage2_decoder/train.py", "tests/conftest.py"):
        assert must in files
    assert not any(f.startswith(".venv") for f in files)


def _scan(files) -> list[str]:
    problems = []
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a file another process is rewriting right now; the next run sees it
        try:
            problems += scan_source(src, str(path.relative_to(REPO)))
        except SyntaxError:
            continue  # half-written by an editor: not this test's business
    return problems


def test_no_unsafe_loading_or_shell_in_the_library():
    files = [p for p in project_python_files() if p.relative_to(REPO).parts[0] != "tests"]
    problems = _scan(files)
    assert problems == [], "\n".join(problems)


def test_no_unsafe_loading_or_shell_in_the_tests():
    problems = _scan([p for p in project_python_files() if p.relative_to(REPO).parts[0] == "tests"])
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("src", [
    "import torch\ntorch.load('x.pt')\n",
    "import torch\ntorch.load('x.pt', weights_only=False)\n",
    "import torch\nflag = True\ntorch.load('x.pt', weights_only=flag)\n",
    "from torch import load\nload('x.pt')\n",
    "import torch as T\nT.serialization.load('x.pt', map_location='cpu')\n",
    "import torchvision.models as tvm\ntvm.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)\n",
    "import torch.hub\ntorch.hub.load_state_dict_from_url('http://x/y.pth')\n",
    "import pickle\npickle.load(open('x', 'rb'))\n",
    "import pickle as p\np.loads(b'')\n",
    "from pickle import loads\nloads(b'')\n",
    "import joblib\njoblib.load('x.pkl')\n",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
    "import yaml\nyaml.load(open('x'))\n",
    "import yaml\nyaml.load(open('x'), Loader=yaml.Loader)\n",
    "import os\nos.system('ls ' + user)\n",
    "import os\nos.popen('ls')\n",
    "import subprocess\nsubprocess.run('ls ' + user, shell=True)\n",
    "from subprocess import check_output as co\nco(cmd, shell=1)\n",
    "eval(user_text)\n",
    "exec(code)\n",
])
def test_the_scan_catches_each_rule_break(src):
    assert scan_source(src), src


@pytest.mark.parametrize("src", [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)\n",
    "import torchvision.models as tvm\ntvm.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(weights_only=True)\n",
    "import numpy as np\nnp.load('x.npz')\nnp.load('x.npz', allow_pickle=False)\n",
    "import yaml\nyaml.load(open('x'), Loader=yaml.SafeLoader)\nyaml.safe_load('a: 1')\n",
    "import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'x', user], check=True)\n",
    "model.eval()\nnet.eval().requires_grad_(False)\n",
    "s = 'torch.load(x) pickle.load os.system(shell=True)'  # torch.load(x)\n",
])
def test_the_scan_accepts_safe_code(src):
    assert scan_source(src) == []


# --- outputs land only where the user said -----------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _in_child(cwd: Path, work) -> int:
    """work() in a forked child whose working directory is `cwd`; returns its exit code."""
    from reliability_helpers import in_forked_child

    def chdir_and_work():
        os.chdir(cwd)
        return work()

    return in_forked_child(chdir_and_work)


def test_train_caption_evaluate_write_only_where_told(shared_cache, coco_dir, coco_records, tmp_path):
    """Run from an empty working directory with the cache in a folder of its own: afterwards the
    working directory is still empty, the cache's folder and the images folder are unchanged,
    and everything new is under --out / --json-out."""
    import shutil

    from click.testing import CliRunner

    cwd, inputs, outputs = tmp_path / "cwd", tmp_path / "inputs", tmp_path / "outputs"
    for d in (cwd, inputs, outputs):
        d.mkdir()
    cache = inputs / "cache.h5"
    shutil.copy(shared_cache, cache)
    watched = {d: _snapshot(d) for d in (inputs, coco_dir)}
    run = outputs / "run"

    def train():
        from stage2_decoder.train import main

        r = CliRunner().invoke(main, ["--features", str(cache), "--out", str(run), "--epochs", "1", "--dry-run",
                                      "--no-progress", "--embed-size", "16", "--hidden-size", "16", "--device", "cpu"])
        return r.exit_code

    def caption():
        from stage2_decoder.caption import main

        return CliRunner().invoke(main, [coco_records[0].path, "--checkpoint", str(run / "best.pt"),
                                         "--device", "cpu"]).exit_code

    def evaluate():
        from stage2_decoder.evaluate import main
        from stage2_decoder.reporting import metrics

        metrics.java_available = lambda: False  # this child only: the pure-Python scorers are enough here
        return CliRunner().invoke(main, ["--checkpoint", str(run / "best.pt"), "--features", str(cache),
                                         "--split", "val", "--device", "cpu", "--json-out",
                                         str(outputs / "eval.json")]).exit_code

    for work in (train, caption, evaluate):
        assert _in_child(cwd, work) == 0, work.__name__
    assert list(cwd.iterdir()) == []
    for d, before in watched.items():
        assert _snapshot(d) == before, d
    new = set(_snapshot(outputs))
    assert {"run/best.pt", "run/last.pt", "run/vocab.json", "eval.json"} <= new
    assert not [f for f in new if f.endswith(".tmp")]
