"""The self-contained HTML gallery of an evaluation: metrics, then each photo with its captions and CIDEr.
"""
from __future__ import annotations

import base64
import io
import math
import os
import warnings
from html import escape
from pathlib import Path

from tqdm import tqdm

from common.atomic import atomic_write
from common.datasets import OUTSIDE_FLAG, inside_folder
from common.jsonio import read_json
from common.text import surrogates_shown


THUMB_PX = 256


# cards on one page: 5,000 embedded thumbnails make a ~60 MB page that browsers struggle with; a capped
# page keeps the best and the worst half by CIDEr (what one looks at) and says how many it left out
MAX_IMAGES = 1000


METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}
table.metrics{border-collapse:collapse;margin:8px 0}
table.metrics th,table.metrics td{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.metrics th{background:#eee}
.meta{color:#555;font-size:13px}
.meta code{font-size:12px}
.controls{margin:12px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.card img{display:block;max-width:100%;max-height:256px;margin:0 auto 8px}
.card .missing{height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.caption{font-weight:600;font-size:15px;margin:4px 0}
.score{float:right;font-variant-numeric:tabular-nums;padding:1px 6px;border-radius:4px;background:#eef}
.refs{margin:6px 0 0;padding-left:18px;color:#444;font-size:13px}
.key{color:#888;font-size:12px;word-break:break-all}
"""


# Re-orders the cards by data-cider or data-index; without JavaScript they stay best -> worst.
_JS = """
(function () {
  var select = document.getElementById('order');
  var box = document.getElementById('cards');
  select.addEventListener('change', function () {
    var cards = Array.prototype.slice.call(box.querySelectorAll('.card'));
    var how = select.value;
    cards.sort(function (a, b) {
      if (how === 'index') { return a.dataset.index - b.dataset.index; }
      var d = parseFloat(a.dataset.cider) - parseFloat(b.dataset.cider);
      return how === 'worst' ? d : -d;
    });
    cards.forEach(function (c) { box.appendChild(c); });
  });
})();
"""


def thumbnail_data_uri(path: str | os.PathLike, size: int = THUMB_PX) -> str | None:
    """The image as a data: URI of a JPEG at most `size` px on its longer side; None if unreadable."""
    # imported on use: importing this module stays free of PIL
    from stage2_decoder.reporting.figures import FigureError, load_display_image

    try:
        im = load_display_image(path, max_side=size)
    except FigureError:
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _metrics_table(report: dict) -> str:
    m = report.get("metrics", {})
    names = [k for k in METRIC_ORDER if k in m] + sorted(k for k in m if k not in METRIC_ORDER)
    head = "".join(f"<th>{escape(k)}</th>" for k in names)
    row = "".join(f"<td>{m[k]:.3f}</td>" if isinstance(m[k], (int, float)) else f"<td>{escape(str(m[k]))}</td>"
                  for k in names)
    return f'<table class="metrics" id="metrics"><tr>{head}</tr><tr>{row}</tr></table>'


def _summary(report: dict) -> str:
    parts = [f"images: {report.get('n_images', len(report.get('images', [])))}"]
    s = report.get("stats")
    if s:
        parts += [f"words used: {s['vocab_used']}", f"distinct captions: {s['distinct_fraction']:.1%}",
                  f"most repeated ({s['most_common_fraction']:.1%}): \u201c{escape(s['most_common_caption'])}\u201d"]
    lines = [" &middot; ".join(parts)]
    for label, key in (("checkpoint", "checkpoint"), ("source", "source")):
        if report.get(key):
            lines.append(f"{label}: <code>{escape(str(report[key]))}</code>")
    if report.get("decode"):
        lines.append("decoding: <code>" + escape(", ".join(f"{k}={v}" for k, v in report["decode"].items()))
                     + "</code>")
    lines += [f"note: {escape(n)}" for n in report.get("notes", [])]
    lines += [f"skipped {escape(str(k))}: {escape(str(e))}" for k, e in (report.get("skipped") or {}).items()]
    return "".join(f'<p class="meta">{ln}</p>' for ln in lines)


_NUMBER = (int, float)


_ITEM_TYPES = {"key": (str, int), "image": (str, type(None)), "caption": (str, type(None)),
               "cider": (*_NUMBER, type(None))}


_STATS_TYPES = {"vocab_used": _NUMBER, "distinct_fraction": _NUMBER, "most_common_fraction": _NUMBER,
                "most_common_caption": (str,)}


def check_report(report, source) -> dict:
    """An `evaluate --json` report whose every field the page uses has its type; else a ValueError naming
    the field (a hand-edited or foreign JSON is one line, not a traceback)."""
    def bad(where: str, value, want: str):
        raise ValueError(f"{source}: {where} is {type(value).__name__} {str(value)[:40]!r}, expected {want}")

    def number(where: str, value) -> None:  # an integer of hundreds of digits has no float: OverflowError
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 1000:
            raise ValueError(f"{source}: {where} is an integer of {value.bit_length()} bits, expected a number a "
                             f"float holds")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's Infinity / NaN, which Python reads
            raise ValueError(f"{source}: {where} is {value}, expected a finite number")

    if not isinstance(report, dict) or not isinstance(report.get("images"), list):
        raise ValueError(f"{source} is not an `evaluate --json` output (no 'images' list)")
    for i, item in enumerate(report["images"]):
        if not isinstance(item, dict):
            bad(f"images[{i}]", item, "an object")
        for k, kinds in _ITEM_TYPES.items():
            if k in item and (not isinstance(item[k], kinds) or isinstance(item[k], bool)):
                bad(f"images[{i}].{k}", item[k], " or ".join(t.__name__ for t in kinds))
        number(f"images[{i}].cider", item.get("cider"))
        refs = item.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            bad(f"images[{i}].references", refs, "a list of strings")
    metrics = report.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(v, (*_NUMBER, str)) for v in metrics.values()):
        bad("metrics", metrics, "an object of numbers")
    for k, v in metrics.items():
        number(f"metrics.{k}", v)
    stats = report.get("stats")
    if stats is not None and not (isinstance(stats, dict) and all(
            isinstance(stats.get(k), kinds) for k, kinds in _STATS_TYPES.items())):
        bad("stats", stats, f"an object with {', '.join(_STATS_TYPES)}")
    for k in _STATS_TYPES if stats is not None else ():
        number(f"stats.{k}", stats[k])
    for k, kind, want in (("notes", list, "a list"), ("skipped", dict, "an object"), ("decode", dict, "an object")):
        if report.get(k) is not None and not isinstance(report[k], kind):
            bad(k, report[k], want)
    if not all(isinstance(n, str) for n in report.get("notes") or []):
        bad("notes", report["notes"], "a list of strings")
    if "n_images" in report and (not isinstance(report["n_images"], int) or isinstance(report["n_images"], bool)):
        bad("n_images", report["n_images"], "an integer")
    return report


def read_report(path: str | os.PathLike) -> object:
    """An `evaluate --json` file, bounded in size and depth (one JSONFileError naming it); its shape and
    fields are check_report's to check."""
    return read_json(path, "evaluation report")


def _thumb(item: dict, thumb_px: int, images_root: str | None) -> str | None:
    """The card's thumbnail; an image resolving outside `images_root` (when given) is not read."""
    path = item.get("image")
    if not isinstance(path, str) or not path:
        return None
    if images_root is not None and not inside_folder(path, images_root):
        warnings.warn(f"image of {item.get('key')!r} not embedded: {path} is outside the images folder "
                      f"{images_root} (--images-root DIR or {OUTSIDE_FLAG} to embed it)")
        return None
    return thumbnail_data_uri(path, thumb_px)


def _score(item: dict) -> float | None:
    """The image's CIDEr, None when it has none (absent, null or NaN: NaN would sort anywhere)."""
    cider = item.get("cider")
    return None if cider is None or math.isnan(cider) else float(cider)


def _rank(item: dict) -> float:
    """What the page orders by, best first: the image's CIDEr, -1 when it has none (so it comes last)."""
    score = _score(item)
    return score if score is not None else -1.0


def _card(index: int, item: dict, thumb: str | None) -> str:
    cider = _score(item)
    shown = f"{cider:.3f}" if cider is not None else "n/a"
    img = (f'<img src="{thumb}" alt="{escape(str(item.get("key", "")))}">' if thumb
           else '<div class="missing">image not readable</div>')
    refs = "".join(f"<li>{escape(r)}</li>" for r in item.get("references", []))
    return (f'<div class="card" data-index="{index}" data-cider="{_rank(item):.6f}">{img}'
            f'<span class="score" title="CIDEr of this image">CIDEr {shown}</span>'
            f'<p class="caption">{escape(item.get("caption") or "")}</p>'
            f'<ol class="refs">{refs}</ol>'
            f'<p class="key">{escape(str(item.get("image") or item.get("key", "")))}</p></div>')


def shown_images(images: list[dict], max_images: int = MAX_IMAGES) -> tuple[list[tuple[int, dict]], int]:
    """(index, image) pairs a page shows, best CIDEr first, and how many were left out: all of them when
    `max_images` is 0 or enough, else the ceil(max/2) best and the floor(max/2) worst (unscored count as worst)."""
    ranked = sorted(enumerate(images), key=lambda p: -_rank(p[1]))
    if not max_images or len(ranked) <= max_images:
        return ranked, 0
    best = (max_images + 1) // 2
    return ranked[:best] + ranked[len(ranked) - (max_images - best):], len(ranked) - max_images


def render_html(report: dict, title: str = "Caption evaluation", thumb_px: int = THUMB_PX,
                progress: bool = False, max_images: int = MAX_IMAGES, images_root: str | os.PathLike | None = None
                ) -> str:
    """The page for an `evaluate` report (metrics, stats, notes, images[{key, image, caption,
    references, cider}]) as a string; cards ordered by CIDEr, best first, at most `max_images`
    of them (0 = all; see `shown_images`). With `images_root`, only images resolving inside it are
    read (the others get an empty card and a warning)."""
    images, left_out = shown_images(report.get("images", []), max_images)
    root = os.fspath(images_root) if images_root is not None else None
    cards = [_card(i, item, _thumb(item, thumb_px, root))
             for i, item in tqdm(images, desc="thumbnails", unit="img", disable=not progress, leave=False)]
    total = len(cards) + left_out
    capped = (f'<p class="meta" id="left-out">showing the {(len(cards) + 1) // 2} best and {len(cards) // 2} worst '
              f'of {total} images by CIDEr: {left_out} left out (every caption is in the evaluation JSON; '
              f'--html-max 0 shows all)</p>') if left_out else ""
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
{_metrics_table(report)}
{_summary(report)}
{capped}
<div class="controls"><label for="order">order: </label><select id="order">
<option value="best">CIDEr, best first</option><option value="worst">CIDEr, worst first</option>
<option value="index">evaluation order</option></select> &middot; {len(cards)} images</div>
<div class="cards" id="cards">
{chr(10).join(cards)}
</div>
<script>{_JS}</script>
</body></html>
"""


def write_html(report: dict, out: str | os.PathLike, title: str = "Caption evaluation", progress: bool = False,
               max_images: int = MAX_IMAGES, images_root: str | os.PathLike | None = None) -> Path:
    """Render the page and write it atomically to `out`."""
    page = surrogates_shown(render_html(report, title, progress=progress, max_images=max_images,
                                        images_root=images_root))  # a name that is not UTF-8 stays writable
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, page, what="HTML gallery")
