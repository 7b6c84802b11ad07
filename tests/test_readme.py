"""The README's examples hold: every `python -m MODULE` it shows is a command with the options shown,
every `make TARGET` is a real target, and every relative link points to a file of the repository.

Cheap by design (no training, no images): commands are checked by their click definitions in one process
and by `make -n`, not run.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# the user guides the README links to; each must exist (the test fails when one is missing)
GUIDES = ("docs/captioning.md", "docs/own-photos.md", "docs/serving.md", "docs/deploy.md", "docs/scale.md",
          "docs/gpu.md", "docs/defaults.md", "docs/sweeps.md")
MAX_LINES, MAX_BYTES = 250, 16 * 1024

CODE_BLOCK = re.compile(r"^ *```[a-z]*\n(.*?)^ *```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _block_lines(text: str) -> list[str]:
    """Lines of the fenced blocks, continuations joined and comments cut."""
    lines = []
    for block in CODE_BLOCK.findall(text):
        lines += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def _snippets(text: str) -> list[str]:
    """Shell lines of the README: the fenced blocks' lines and the inline code spans."""
    spans = [" ".join(span.split()) for span in CODE_SPAN.findall(CODE_BLOCK.sub("", text))]
    return _block_lines(text) + [s for s in spans if s]


def _module_commands(text: str) -> list[tuple[str, list[str], bool]]:
    """(module, words after it, whether it is a complete example) for every `python -m MODULE ...` shown.

    A complete example (arguments given, no [optional] parts, `|` alternatives or `...`) must parse as
    written; elsewhere (the entry-point table, synopses) only the option names are checked.
    """
    found = []
    for row in re.findall(r"^\|(.*)\|$", text, re.M):  # entry-point table: command | does | main options
        cells = row.split("|")
        m = re.match(r"\s*`python -m ([\w.]+)`", cells[0])
        if m and len(cells) >= 3:
            found.append((m.group(1), " ".join(CODE_SPAN.findall(cells[2])).split(), False))
    for snippet in _snippets(text):
        for part in re.split(r"(?=(?:\S*/)?python -m )", snippet):
            m = re.match(r"(?:\S*/)?python -m ([A-Za-z_][\w.]*)(.*?)(?:\s*(?:&&|;|\|\|).*)?$", part)
            if m:
                words = shlex.split(m.group(2).replace("[", " ").replace("]", " ").replace("|", " "))
                complete = bool(words) and not re.search(r"\[|\||\.\.\.", m.group(2))
                found.append((m.group(1), words, complete))
    return found


def _make_targets(text: str) -> set[str]:
    targets = set()
    for snippet in _snippets(text):
        m = re.match(r"make ((?:[a-z][\w-]*\s*)+)(?=$|\s[A-Z_]+=)", snippet + " ")
        if m:
            targets.update(m.group(1).split())
    return targets


def _command(module: str, words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command `python -m module words...` runs, and the words it parses."""
    package_main = (REPO / Path(*module.split(".")) / "__main__.py").is_file()
    mod = importlib.import_module(f"{module}.__main__" if package_main else module)
    imported = [v for v in vars(mod).values() if isinstance(v, click.Command)]
    # the module's own command(s); else the one it imports to run
    cmds = [c for c in imported if getattr(c.callback, "__module__", None) == mod.__name__] or imported
    assert cmds, f"README shows `python -m {module}`, which defines no click command"
    groups = [c for c in cmds if isinstance(c, click.Group)]
    cmd = groups[0] if groups else next((c for c in cmds if c.callback.__name__ == "main"), cmds[0])
    if isinstance(cmd, click.Group):
        sub = next((w for w in words if not w.startswith("-")), None)
        if sub is None:  # the group itself, e.g. in the entry-point table
            return cmd, words
        assert sub in cmd.commands, f"README shows `python -m {module} {sub}`: no such subcommand"
        return cmd.commands[sub], words[words.index(sub) + 1:]
    return cmd, words


def test_readme_is_a_short_guide():
    text = _text()
    assert len(text.splitlines()) <= MAX_LINES and len(text.encode()) <= MAX_BYTES, \
        f"README is {len(text.splitlines())} lines / {len(text.encode())} bytes"
    assert not re.search(r"\bsessions?\b", text, re.I), "README dates results by periods of work"


def test_readme_modules_and_their_options_exist():
    shown = _module_commands(_text())
    assert len({m for m, _, _ in shown}) >= 8, "the entry-point table is missing from the README"
    problems = []
    for module, words, complete in shown:
        path = REPO / Path(*module.split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
            problems.append(f"`python -m {module}` does not exist")
            continue
        if path.with_suffix(".py").is_file() and not re.search(
                r"""^if __name__ == ["']__main__["']""", path.with_suffix(".py").read_text(encoding="utf-8"), re.M):
            problems.append(f"`python -m {module}` would do nothing: it has no __main__ guard")
        cmd, args = _command(module, words)
        result = CliRunner().invoke(cmd, ["--help"])
        if result.exit_code != 0:
            problems.append(f"`python -m {module} --help` failed: {result.output}")
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for word in words:
            option = word.split("=")[0]
            if re.fullmatch(r"--?[a-z][\w-]*", option) and option not in known:
                problems.append(f"`python -m {module}` has no option {option}")
        if complete:
            try:
                cmd.make_context(f"python -m {module}", list(args))
            except click.ClickException as exc:
                problems.append(f"`python -m {module} {' '.join(words)}` does not parse: {exc.format_message()}")
    assert not problems, "README shows commands that do not parse:\n" + "\n".join(sorted(set(problems)))


def test_readme_make_targets_exist():
    targets = _make_targets(_text())
    assert {"demo", "test", "features", "train", "caption", "sweep"} <= targets, targets
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    problems = []
    for target in sorted(targets):
        if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.M):
            problems.append(f"`make {target}`: no such rule")
            continue
        # a target that needs its own variable (make caption IMAGES=...) gets a harmless value for it
        done = subprocess.run(["make", "-n", "--no-print-directory", target, "IMAGES=README.md"], cwd=REPO,
                              capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            problems.append(f"`make -n {target}` failed: {done.stderr.strip()}")
    assert not problems, "README shows make targets that do not work:\n" + "\n".join(problems)


def test_make_quotes_paths_leaves_out_empty_settings_and_ignores_the_shells_exports():
    """DATA="/x y" split into extra arguments, WEIGHTS= swallowed the next option (the error named --out), and
    an exported $OUT sent extraction and training elsewhere."""
    import shlex

    def command(target, *settings, env=None):
        done = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", target, *settings],
                              cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
        assert done.returncode == 0, done.stderr
        line = next(ln for ln in done.stdout.replace("\\\n", " ").splitlines() if "-m stage" in ln)
        return shlex.split(line)

    words = command("features", "DATA=/tmp/x y", "WEIGHTS=", "DEVICE=", "LIMIT=8")
    assert words[words.index("--images") + 1] == "/tmp/x y/coco2017-mini/images"
    assert "--weights" not in words and "--device" not in words and words[words.index("--limit") + 1] == "8"
    words = command("train", "RUN=runs/my run", env={"OUT": "/tmp/elsewhere.h5", "RUN": "/tmp/elsewhere"})
    assert words[words.index("--out") + 1] == "runs/my run"
    assert words[words.index("--features") + 1] == "cache/coco-resnet152.h5"


def test_readme_links_point_to_files():
    links = [link.split("#")[0] for link in LINK.findall(_text()) if not re.match(r"[a-z]+:|#", link)]
    assert links, "the README links to nothing"
    missing = sorted({link for link in links if not (REPO / link).exists() and link not in GUIDES})
    assert not missing, f"README links to files that do not exist: {missing}"
    assert set(GUIDES) <= set(links), f"README does not link {sorted(set(GUIDES) - set(links))}"


@pytest.mark.parametrize("guide", GUIDES)
def test_linked_guide_exists(guide):
    assert (REPO / guide).is_file(), f"{guide}, linked from the README, is missing"


def test_readme_python_api_names_exist():
    blocks = re.findall(r"^ *```python\n(.*?)^ *```", _text(), re.S | re.M)
    assert blocks, "the README shows no Python API example"
    for block in blocks:
        code = textwrap.dedent(block)
        compile(code, "README.md", "exec")
        for module, names in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", code, re.M):
            for name in (n.strip() for n in names.split(",")):
                obj = getattr(importlib.import_module(module), name, None)
                assert obj is not None, f"README imports {name} from {module}, which has none"
                for attr in re.findall(rf"\b{name}\.(\w+)", code):
                    assert hasattr(obj, attr), f"README calls {name}.{attr}, which does not exist"
