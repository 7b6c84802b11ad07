"""CLI: python -m stage1_extract --images DIR --captions FILE --out FILE.h5 [...]"""
from __future__ import annotations

import click

from common.backbones import DEFAULT_BACKBONE, REGISTRY, VIEWS
from common.cli import run_guarded
from common.datasets import FORMATS, OUTSIDE_FLAG
from stage1_extract.distributed import RankFailed
from stage1_extract.extract import ExtractConfig, extract


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True,
              help="Captions file format (auto: from its extension and first bytes).")
@click.option("--images", required=True, type=click.Path(), help="Folder of the dataset's images.")
@click.option("--captions", required=True, type=click.Path(),
              help="Captions file (COCO JSON, Karpathy dataset_*.json, Flickr8k captions.txt, Flickr30k .token/.csv, "
                   "or your own image,caption[,split] CSV / JSON Lines: docs/own-photos.md).")
@click.option("--backbone", type=click.Choice(list(REGISTRY)), default=DEFAULT_BACKBONE, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Output HDF5 cache (work in progress lives in OUT.parts/ until complete).")
@click.option("--weights", default="default", show_default=True,
              help="'default' (torchvision ImageNet weights), 'none' (random, plumbing tests only) or a state_dict file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=ExtractConfig.batch_size, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=ExtractConfig.workers, show_default=True,
              help="DataLoader worker processes decoding images.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images (by image id).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--views", type=click.IntRange(1, len(VIEWS)), default=ExtractConfig.views, show_default=True,
              help=f"Views cached per image, in this order: {', '.join(VIEWS)}. The centre crop is what captioning "
                   f"sees; the others are training augmentations (stage 2 draws one at random per caption). "
                   f"Each view costs one more forward pass.")
@click.option(OUTSIDE_FLAG, "allow_outside_images", is_flag=True,
              help="Also read captions entries whose image resolves outside --images (absolute, ../, symlinks).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=ExtractConfig.dist_timeout_s, show_default=True,
              help="Under torchrun: seconds a rank waits for the others before giving up.")
def main(dataset, images, captions, backbone, out, weights, batch_size, workers, device, limit, dtype, views,
         allow_outside_images, no_progress, dist_timeout):
    """Extract pooled CNN features for every image of a captions dataset into an HDF5 cache."""
    cfg = ExtractConfig(images=images, captions=captions, out=out, dataset=dataset, backbone=backbone,
                        weights=weights, batch_size=batch_size, workers=workers, device=device, limit=limit,
                        dtype=dtype, views=views, progress=not no_progress, dist_timeout_s=dist_timeout,
                        allow_outside_images=allow_outside_images)

    def work():
        try:
            s = extract(cfg)
        except RankFailed as e:  # torchrun: this rank is fine, another one printed the real error
            click.echo(f"error: {e}", err=True)
            return 1
        if s.rank != 0:  # under torchrun rank 0 speaks for all
            return 0
        if s.was_complete:
            click.echo(f"{s.out} is already complete ({s.total} images); nothing to do")
            return 0
        click.echo(f"wrote {s.out}: {s.total} images, {s.done_now} extracted now, {s.already_done} resumed, "
                   f"{len(s.failed)} skipped, {s.images_per_s:.1f} images/s")
        for key, reason in list(s.failed.items())[:20]:
            click.echo(f"  skipped {key}: {reason}")
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg="extraction interrupted; finished batches are kept in "
                                                        f"{out}.parts/, re-run the same command to resume"))


if __name__ == "__main__":
    main()
