"""The click layer's error policy: library errors become one line on stderr and an exit code."""
from __future__ import annotations

import math
import signal
import sys
import warnings
from collections.abc import Callable, Collection
from dataclasses import MISSING, fields

import click
import torch

from common.backbones import BackboneError, ImageError
from common.datasets import DatasetError
from common.feature_cache import CacheError
from common.vocab import VocabError

# the errors a user can cause with bad input (or a full disk, or a diverging run: FloatingPointError
# is train's "loss became nan"); anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (BackboneError, ImageError, DatasetError, CacheError, VocabError,
                                                ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                                                NotADirectoryError, OSError, FloatingPointError, MemoryError,
                                                torch.cuda.OutOfMemoryError)  # = torch.OutOfMemoryError in 2.5+


class FiniteFloat(click.ParamType):
    """A float option that refuses inf and nan (`--length-penalty -inf` is no setting), naming the option."""
    name = "float"

    def convert(self, value, param, ctx):
        v = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


FINITE = FiniteFloat()
INT64 = click.IntRange(-(2**63), 2**63 - 1)  # what torch (seeds) and numpy take: a bigger one is a usage error


class Terminated(Exception):
    """Raised in the main thread on SIGTERM, so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def one_line(e: BaseException) -> str:
    """An exception as one line: library messages (h5py, torch) often span several."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # one line per warning (a skipped caption, a corrupt EXIF tag), not Python's two-line format
    # with the source line of the library that warned
    name = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
    print(f"warning: {name}{one_line(message) if isinstance(message, Exception) else message}",
          file=file or sys.stderr)


def run_guarded(work: Callable[[], int], interrupted_msg: str = "interrupted") -> int:
    """Run `work`, mapping user errors to one 'error: ...' line + exit 1, Ctrl-C to 130, SIGTERM to 143.

    Warnings print as one 'warning: ...' line each while `work` runs (DataLoader workers forked
    meanwhile inherit that).
    """
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return work()
    except KeyboardInterrupt:
        click.echo(f"\n{interrupted_msg}", err=True)
        return 130
    except Terminated:
        click.echo(f"\n{interrupted_msg}", err=True)
        return 143
    except USER_ERRORS as e:
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
            kind = {int: INT64, float: FINITE}.get(kind, kind)
            f = click.option("--" + fl.name.replace("_", "-"), fl.name, type=kind, default=fl.default,
                             show_default=True)(f)
        return f
    return decorate
