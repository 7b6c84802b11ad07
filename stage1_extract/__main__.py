"""CLI: python -m stage1_extract --images DIR --captions FILE --out FILE.h5 [...]"""
from __future__ import annotations

import click

from common.backbones import DEFAULT_BACKBONE, REGISTRY
from common.cli import run_guarded
from stage1_extract.extract import ExtractConfig, extract


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(["auto", "coco", "flickr8k"]), default="auto", show_default=True,
              help="Captions file format (auto: .json -> coco, .txt/.csv -> flickr8k).")
@click.option("--images", required=True, type=click.Path(), help="Folder of the dataset's images.")
@click.option("--captions", required=True, type=click.Path(), help="Captions file (COCO JSON or Flickr8k captions.txt).")
@click.option("--backbone", type=click.Choice(list(REGISTRY)), default=DEFAULT_BACKBONE, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Output HDF5 cache (written as OUT.partial until complete).")
@click.option("--weights", default="default", show_default=True,
              help="'default' (torchvision ImageNet weights), 'none' (random, plumbing tests only) or a state_dict file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=ExtractConfig.batch_size, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=ExtractConfig.workers, show_default=True,
              help="DataLoader worker processes decoding images.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images (by image id).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(dataset, images, captions, backbone, out, weights, batch_size, workers, device, limit, dtype, no_progress):
    """Extract pooled CNN features for every image of a captions dataset into an HDF5 cache."""
    cfg = ExtractConfig(images=images, captions=captions, out=out, dataset=dataset, backbone=backbone,
                        weights=weights, batch_size=batch_size, workers=workers, device=device, limit=limit,
                        dtype=dtype, progress=not no_progress)

    def work():
        s = extract(cfg)
        if s.done_now == 0 and s.failed_now == 0 and s.already_done == s.total:
            click.echo(f"{s.out} is already complete ({s.total} images); nothing to do")
            return 0
        click.echo(f"wrote {s.out}: {s.total} images, {s.done_now} extracted now, {s.already_done} resumed, "
                   f"{len(s.failed)} skipped, {s.images_per_s:.1f} images/s")
        for key, reason in list(s.failed.items())[:20]:
            click.echo(f"  skipped {key}: {reason}")
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg="extraction interrupted; finished rows are kept in "
                                                        f"{out}.partial, re-run the same command to resume"))


if __name__ == "__main__":
    main()
