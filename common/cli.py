"""The click layer's error policy: library errors become one line on stderr and an exit code."""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Collection
from dataclasses import MISSING, fields

import click

from common.backbones import BackboneError, ImageError
from common.datasets import DatasetError
from common.feature_cache import CacheError
from common.vocab import VocabError

# the errors a user can cause with bad input; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (BackboneError, ImageError, DatasetError, CacheError, VocabError,
                                                ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                                                NotADirectoryError, OSError)


class Terminated(Exception):
    """Raised in the main thread on SIGTERM, so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_guarded(work: Callable[[], int], interrupted_msg: str = "interrupted") -> int:
    """Run `work`, mapping user errors to 'error: ...' + exit 1, Ctrl-C to 130, SIGTERM to 143."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return work()
    except KeyboardInterrupt:
        click.echo(f"\n{interrupted_msg}", err=True)
        return 130
    except Terminated:
        click.echo(f"\n{interrupted_msg}", err=True)
        return 143
    except USER_ERRORS as e:
        click.echo(f"error: {e}", err=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
        sys.stdout.flush()


def config_options(cls, skip: Collection[str] = ()):
    """Click options mapping one-to-one onto a config dataclass' fields (`--field-name`)."""
    def decorate(f):
        for fl in reversed(fields(cls)):
            if fl.name in skip or fl.default is MISSING:
                continue
            kind = type(fl.default) if fl.default is not None else str
            f = click.option("--" + fl.name.replace("_", "-"), fl.name, type=kind, default=fl.default,
                             show_default=True)(f)
        return f
    return decorate
