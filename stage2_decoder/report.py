"""An evaluation as one self-contained HTML page: look at every photo next to its caption.

    python -m stage2_decoder.evaluate --checkpoint best.pt --features F.h5 --split test --html report.html
    python -m stage2_decoder.report EVAL.json --out report.html    # from a saved `evaluate --json`

The page has the summary metrics table at the top, then one card per image: a small JPEG
thumbnail embedded as base64 (the page needs no server and no other file), the generated caption,
the reference captions and the image's CIDEr; ordered best to worst, re-sortable in the page. At
most --html-max cards (default 1000): the best and the worst half, with a note of how many were left out.
A Content-Security-Policy forbids every external request, so the page cannot depend on one.

Only images inside one folder are read and embedded: `evaluate` passes its images folder; the
`report` command takes `--images-root`, else the `images_root` the JSON records, else the JSON's
own folder (a JSON from elsewhere should be rendered with `--images-root`); `--allow-outside-images`
embeds every image the JSON names.
"""
from __future__ import annotations

import os

import click

from common.cli import bounded, run_guarded
from common.datasets import OUTSIDE_FLAG
from common.paths import refuse_overwriting
from stage2_decoder.reporting.gallery import MAX_IMAGES, check_report, read_report, write_html


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("eval_json", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML page to write.")
@click.option("--title", default="Caption evaluation", show_default=True)
@click.option("--html-max", type=bounded("html_max"), default=MAX_IMAGES, show_default=True,
              help="Most images on the page: the best and worst half by CIDEr (0 = all).")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Embed only images inside this folder [default: the images_root the JSON records, else the "
                   "JSON's own folder].")
@click.option(OUTSIDE_FLAG, "allow_outside_images", is_flag=True, help="Embed every image the JSON names.")
@click.option("--no-progress", is_flag=True, help="No progress bar while thumbnails are made.")
@click.option("--dry-run", is_flag=True, help="Check the JSON and say what the page would hold; write nothing.")
def main(eval_json, out, title, html_max, images_root, allow_outside_images, no_progress, dry_run):
    """Turn an `evaluate --json` file into a self-contained HTML gallery."""
    def work():
        refuse_overwriting({"--out": out}, {"evaluation report": eval_json})
        report = check_report(read_report(eval_json), eval_json)
        here = os.path.dirname(os.path.abspath(eval_json))
        for item in report["images"]:  # a relative image path is the JSON's, not the current folder's
            if isinstance(item.get("image"), str) and item["image"] and not os.path.isabs(item["image"]):
                item["image"] = os.path.join(here, item["image"])
        recorded = report.get("images_root")
        root = None if allow_outside_images else (
            images_root or (recorded if isinstance(recorded, str) and recorded else None)
            or os.path.dirname(os.path.abspath(eval_json)))
        shown = min(len(report["images"]), html_max or len(report["images"]))
        if dry_run:
            click.echo(f"dry run: {out} would show {shown} of {len(report['images'])} images"
                       + (f" (embedding only images inside {root})" if root else ""))
            return 0
        write_html(report, out, title, progress=not no_progress, max_images=html_max, images_root=root)
        click.echo(f"wrote {out} ({shown} of {len(report['images'])} images)")
        return 0

    raise SystemExit(run_guarded(work))


if __name__ == "__main__":
    main()
