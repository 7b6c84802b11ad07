"""Print image paths of a run's split: python -m stage2_decoder.samples RUN_DIR --features F.h5 --split test -n 8"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from common.cli import bounded, run_guarded
from common.datasets import load_dataset
from common.feature_cache import read_meta
from common.jsonio import read_json
from common.text import printable


def split_image_paths(run_dir: str, features: str, split: str = "test", n: int = 8) -> list[str]:
    """Paths of the first n images of `split` in RUN_DIR/split.json (dataset from the cache)."""
    path = Path(run_dir) / "split.json"
    keys = read_json(path, "split file", expect=dict).get(split)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"split file {path} has no {split!r} list of image keys")
    meta = read_meta(features)
    by_key = {r.key: r.path for r in load_dataset(meta.dataset_format, meta.captions_file, meta.images_dir)}
    return [by_key[k] for k in keys[:n] if k in by_key]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--features", required=True, type=click.Path())
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("-n", type=bounded("limit"), default=8, show_default=True)
@click.option("--print0", is_flag=True, help="Each path as its raw bytes ended by a NUL byte (for xargs -0).")
def main(run_dir, features, split, n, print0):
    def work():
        for p in split_image_paths(run_dir, features, split, n):
            if print0:  # any name, exactly: what xargs -0 hands on
                sys.stdout.buffer.write(os.fsencode(p) + b"\0")
            else:
                click.echo(printable(p))  # one line each: a name's line break or ESC printed escaped
        sys.stdout.flush()
        return 0
    raise SystemExit(run_guarded(work))


if __name__ == "__main__":
    main()
