"""The click layer: its error policy (library errors become one line on stderr and an exit code) and the
options it generates from config dataclasses (train's settings, the shared decode and sampling options)."""
from __future__ import annotations

import functools
import io
import os
import select
import signal
import sys
import typing
import warnings
from collections.abc import Callable, Collection
from dataclasses import MISSING, field, fields

import click

from common.bounds import BOUNDS, check
from common.text import escape_controls

# the errors a user can cause with bad input (or a full disk, or a diverging run: FloatingPointError
# is train's "loss became nan"); the library's own errors (BackboneError, ImageError, DatasetError,
# CacheError, VocabError, CheckpointError, ...) are all ValueErrors; anything else is a bug and keeps its
# traceback. Nothing here imports torch: the ONNX captioner's CLI runs without it.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                                                NotADirectoryError, OSError, FloatingPointError, MemoryError)


def _user_errors() -> tuple[type[BaseException], ...]:
    torch = sys.modules.get("torch")  # its out-of-memory error, when torch is in use at all
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return USER_ERRORS + ((oom,) if oom is not None else ())


class Bounded(click.ParamType):
    """A number option limited as common.bounds.BOUNDS[setting] says (the table the API and grids use)."""

    def __init__(self, setting: str):
        self.setting = setting
        self.bound = BOUNDS[setting]
        self.name = "integer" if self.bound.kind is int else "float"

    def convert(self, value, param, ctx):
        base = click.INT if self.bound.kind is int else click.FLOAT
        v = base.convert(value, param, ctx)
        try:
            return check(self.setting, v)
        except ValueError:
            self.fail(f"{value!r} is not {self.bound.describe()}", param, ctx)


def bounded(setting: str) -> Bounded:
    """The click type of a number setting with a row in common.bounds.BOUNDS."""
    return Bounded(setting)


class Terminated(Exception):
    """Raised in the main thread on SIGTERM, so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def one_line(e: BaseException) -> str:
    """An exception as one line: library messages (h5py, torch) often span several, and one may quote user
    text holding terminal controls (an ESC sequence, a bidi override), which are escaped."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return escape_controls(text) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # one line per warning (a skipped caption, a corrupt EXIF tag), not Python's two-line format
    # with the source line of the library that warned
    name = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
    text = one_line(message) if isinstance(message, Exception) else escape_controls(str(message))
    print(f"warning: {name}{text}", file=file or sys.stderr)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader is gone (poll reports an error, or a hang-up for a socket)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), or no real stdout
        return False


def run_guarded(work: Callable[[], int], interrupted_msg: str | Callable[[], str] = "interrupted") -> int:
    """Run `work`, mapping user errors to one 'error: ...' line + exit 1, Ctrl-C to 130, SIGTERM to 143
    (saying `interrupted_msg`, or what it returns when called then).

    Warnings print as one 'warning: ...' line each while `work` runs (DataLoader workers forked
    meanwhile inherit that).
    """
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        # a caption in letters the terminal's encoding lacks (Latin-1 and Japanese) prints escaped, as
        # stderr already does, instead of failing after the work is done
        sys.stdout.reconfigure(errors="backslashreplace")
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return work()
    except KeyboardInterrupt:
        click.echo(f"\n{interrupted_msg() if callable(interrupted_msg) else interrupted_msg}", err=True)
        return 130
    except Terminated:
        click.echo(f"\n{interrupted_msg() if callable(interrupted_msg) else interrupted_msg}", err=True)
        return 143
    except BrokenPipeError as e:
        if not _stdout_reader_gone():
            click.echo(f"error: {one_line(e)}", err=True)
            return 1
        # `caption ... | head`: the reader has what it wanted; end as a tool killed by SIGPIPE does, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flushes go nowhere
        return 128 + signal.SIGPIPE
    except _user_errors() as e:
        click.echo(f"error: {one_line(e)}", err=True)
        return 1
    finally:
        warnings.showwarning = old_show
        signal.signal(signal.SIGTERM, old)
        sys.stdout.flush()


def config_options(cls, skip: Collection[str] = ()):
    """Click options mapping one-to-one onto a config dataclass' fields (`--field-name`)."""
    def decorate(f):
        for fl in reversed(fields(cls)):
            if fl.name in skip or fl.default is MISSING:
                continue
            kind = type(fl.default) if fl.default is not None else str
            kind = bounded(fl.name) if kind in (int, float) else kind  # limits from the one table
            if fl.name in getattr(cls, "CHOICES", {}):
                kind = click.Choice(list(cls.CHOICES[fl.name]))
            f = click.option("--" + fl.name.replace("_", "-"), fl.name, type=kind, default=fl.default,
                             show_default=True)(f)
        return f
    return decorate


def opt(default=MISSING, help: str | None = None, **cli):
    """A config field with its CLI metadata for `config_group`: help, and optionally choices, path (a file or
    folder name: click.Path), flag (the option's name when not --field-name)."""
    return field(default=default, metadata={"help": help, **cli})


def config_group(cls, param: str):
    """Click options for every field of config dataclass `cls` (help, choices and name from the field's metadata, a
    number's limits from common.bounds.BOUNDS by the field's name); the command receives them built into one `cls`
    instance named `param`. A field without a default is a required option; a bool defaulting to True is a
    `--no-field-name` flag."""
    hints = typing.get_type_hints(cls)

    def decorate(f):
        names = [fl.name for fl in fields(cls)]

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            kwargs[param] = cls(**{n: kwargs.pop(n) for n in names})
            return f(*args, **kwargs)

        for fl in reversed(fields(cls)):
            kind = next((a for a in typing.get_args(hints[fl.name]) if a is not type(None)), hints[fl.name])
            meta, name = fl.metadata, fl.name.replace("_", "-")
            if kind is bool:
                flag = meta.get("flag") or (f"--no-{name}" if fl.default else f"--{name}")
                wrapper = click.option(flag, fl.name, is_flag=True, flag_value=not fl.default, default=fl.default,
                                       help=meta.get("help"))(wrapper)
                continue
            if meta.get("path"):
                kind = click.Path()
            elif meta.get("choices") is not None:
                kind = click.Choice(list(meta["choices"]))
            elif kind in (int, float):  # every number has its limits in the one table
                kind = bounded(fl.name)
            required = fl.default is MISSING
            # a required option is given no default at all: click 8.2+ takes default=None as a value given
            given = {} if required else {"default": fl.default, "show_default": fl.default is not None}
            wrapper = click.option(meta.get("flag") or f"--{name}", fl.name, type=kind, required=required,
                                   help=meta.get("help"), **given)(wrapper)
        return wrapper
    return decorate


def decode_options(f):
    """--beam-size, --max-len, ... from stage2_decoder's DecodeConfig; the command gets `decode: DecodeConfig`."""
    from stage2_decoder.decoding.config import DecodeConfig  # torch-free

    return config_group(DecodeConfig, "decode")(f)


def sampling_options(f):
    """--num-captions, --sample, --temperature, --top-p, --seed; the command gets `sampling: SampleConfig`."""
    from stage2_decoder.decoding.config import SampleConfig  # torch-free

    return config_group(SampleConfig, "sampling")(f)
