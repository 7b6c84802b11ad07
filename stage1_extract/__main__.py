"""CLI: python -m stage1_extract --images DIR --captions FILE --out FILE.h5 [...]"""
from __future__ import annotations

import os

import click

from common.cli import config_group, run_guarded
from common.text import printable
from stage1_extract.distributed import RankFailed
from stage1_extract.extract import ExtractConfig, extract, plan


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_group(ExtractConfig, "cfg")
@click.option("--dry-run", is_flag=True,
              help="Check the settings, the captions file, the images folder and the backbone name; print what "
                   "would be extracted; load no CNN.")
def main(cfg: ExtractConfig, dry_run):
    """Extract pooled CNN features for every image of a captions dataset into an HDF5 cache."""
    def work():
        if dry_run:  # no process group: under torchrun each rank checks, the first one says so
            line = plan(cfg)
            if os.environ.get("RANK", "0") == "0":
                click.echo(f"dry run: {line}")
            return 0
        try:
            s = extract(cfg)
        except RankFailed as e:  # torchrun: this rank is fine, another one printed the real error
            click.echo(f"error: {e}", err=True)
            return 1
        if s.rank != 0:  # under torchrun rank 0 speaks for all
            return 0
        if s.was_complete:
            failed = ""
            if s.failed:  # made when they could not be read: a finished cache is not re-opened to retry them
                key, why = next(iter(s.failed.items()))
                failed = (f"; {len(s.failed)} of them could not be read when it was made (first: {printable(key)}: "
                          f"{printable(why)}): delete it and re-run to retry them")
            click.echo(f"{s.out} is already complete ({s.total} images){failed}; nothing to do")
            return 0
        click.echo(f"wrote {s.out}: {s.total} images, {s.done_now} extracted now, {s.already_done} resumed, "
                   f"{len(s.failed)} skipped, {s.images_per_s:.1f} images/s")
        for key, reason in list(s.failed.items())[:20]:
            click.echo(f"  skipped {printable(key)}: {printable(reason)}")
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg="extraction interrupted; finished batches are kept in "
                                                        f"{cfg.out}.parts/, re-run the same command to resume"))


if __name__ == "__main__":
    main()
