"""The device check's results against the GPU targets, as the Markdown that goes into bench/RESULTS.md.

    python bench/gpu_report.py bench/results/gpu.json     # prints the tables

Each target has a floor (required) and a goal (docs/gpu.md); a row says which it meets, or "missed". The
headline row projects all of COCO (123,287 images) from JPEGs through stage 1 at the measured end-to-end
rate, then the default recipe at the projected time. Then stage 1's settings side by side (the choices
part), and where the time goes (the profile part): per step, the GPU's busy share and its top kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COCO_IMAGES = 123_287
HEADLINE_S = 600  # all of COCO from JPEGs to an SCST-trained captioner in under 10 minutes

# (what, where in gpu.json, "min" if higher is better else "max", floor, goal, unit)
TARGETS = [
    ("stage 1 {backbone}, decode + forward + write, COCO-size JPEGs", ("stage1", "end_to_end_img_s"), "min", 3000,
     5000, "img/s"),
    ("stage 1 {backbone} forward alone, {precision}", ("stage1", "forward_img_s"), "min", 6000, 10000, "img/s"),
    ("cross-entropy epoch, full COCO size", ("stage2", "xe_epoch_s"), "max", 30, 15, "s"),
    ("SCST epoch, full COCO size", ("stage2", "scst_epoch_s"), "max", 120, 45, "s"),
    ("500-image beam-3 validation", ("stage2", "val_500_beam3_s"), "max", 5, 2, "s"),
    ("default recipe (20 XE + 2 SCST epochs with validation), projected", ("stage2", "recipe_projected_s"), "max",
     900, 480, "s"),
    ("host syncs per cross-entropy step", ("syncs", "xe_step"), "max", 0, 0, ""),
    ("host syncs in an SCST step, besides the one read of its samples", ("syncs", "scst_step"), "max", 0, 0, ""),
    ("host syncs in a beam-3 decode, besides the one read of its captions", ("syncs", "beam"), "max", 0, 0, ""),
]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def verdict(value, sense: str, floor: float, goal: float) -> str:
    if (value := _number(value)) is None:
        return "not measured"
    better = (lambda a, b: a >= b) if sense == "min" else (lambda a, b: a <= b)
    return "goal" if better(value, goal) else "floor" if better(value, floor) else "missed"


def _fmt(value, unit: str) -> str:
    if (value := _number(value)) is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:g}"
    return f"{text} {unit}".strip()


def _part(doc: dict, name: str) -> dict:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def headline(doc: dict) -> float | None:
    """Seconds for all of COCO: stage 1 at the end-to-end rate, then the projected recipe."""
    rate = _number(_part(doc, "stage1").get("end_to_end_img_s"))
    recipe = _number(_part(doc, "stage2").get("recipe_projected_s"))
    if not rate or recipe is None:
        return None
    return COCO_IMAGES / rate + recipe


def full_size(doc: dict) -> str | None:
    """None if stage 2 was timed on all of COCO's images, else why its "full COCO size" rows cannot be rated
    (a --tiny run's 400 images met every goal)."""
    images = _number(_part(doc, "stage2").get("images"))
    if images == COCO_IMAGES:
        return None
    return "not full size" + (f" ({images:,.0f} images)" if images is not None else "")


def report(doc: dict) -> str:
    lines = [f"{doc.get('device')}; torch {doc.get('torch')}, CUDA {doc.get('cuda')} ({doc.get('date')}, "
             f"{doc.get('commit')})", "", "| measure | floor | goal | measured | meets |", "|---|---|---|---|---|"]
    stage1, small = _part(doc, "stage1"), full_size(doc)
    for what, (part, key), sense, floor, goal, unit in TARGETS:
        value = _part(doc, part).get(key)
        sign = ">=" if sense == "min" else "<="
        meets = verdict(value, sense, floor, goal)
        # stage 2's rows: its epochs, the recipe, and validation (on min(500, the val split) images)
        if small and meets != "not measured" and part == "stage2":
            meets = small
        what = what.format(backbone=stage1.get("backbone") or "resnet152",
                           precision={"bfloat16": "bf16", None: "bf16"}.get(stage1.get("precision"),
                                                                            str(stage1.get("precision"))))
        lines.append(f"| {what} | {sign} {_fmt(floor, unit)} | {sign} {_fmt(goal, unit)} | {_fmt(value, unit)} | "
                     f"{meets} |")
    total = headline(doc)
    meets = "not measured" if total is None else small or ("yes" if total <= HEADLINE_S else "no")
    lines.append(f"| all of COCO, JPEGs to an SCST-trained captioner (stage 1 + recipe), projected | - | "
                 f"<= {_fmt(HEADLINE_S, 's')} | {_fmt(total, 's')} | {meets} |")
    ch = _part(doc, "stage1_choices")
    if ch.get("forward_img_s_by_batch") or ch.get("end_to_end_img_s"):
        lines += ["", "| stage 1 setting | img/s |", "|---|---|"]
        by_batch = ch.get("forward_img_s_by_batch") or {}
        lines += [f"| forward alone, batch {b} | {_fmt(v, '')} |" for b, v in by_batch.items()]
        if ch.get("forward_img_s_contiguous") is not None:
            lines.append(f"| forward alone, batch {ch.get('contiguous_batch')}, without channels_last | "
                         f"{_fmt(ch['forward_img_s_contiguous'], '')} |")
        lines += [f"| end to end over {ch.get('end_to_end_images')} JPEGs, {k} | {_fmt(v, '')} |"
                  for k, v in (ch.get("end_to_end_img_s") or {}).items()]
        if ch.get("decode_only_img_s") is not None:
            lines.append(f"| decoding alone, PIL in DataLoader workers ({ch.get('workers')}) | "
                         f"{_fmt(ch['decode_only_img_s'], '')} |")
        if (tv := ch.get("torchvision_decode_img_s")) is not None:  # or the error that stopped it
            lines.append(f"| decoding alone, torchvision.io.decode_jpeg on the device in one process "
                         f"({ch.get('torchvision_decode_images')} JPEGs) | "
                         f"{_fmt(tv, '') if _number(tv) is not None else str(tv)[:120].replace('|', '/')} |")
    prof = _part(doc, "profile")
    if any(prof.values()):
        lines += ["", "| where the time goes | ms per step | GPU busy | top kernels (ms per step) |",
                  "|---|---|---|---|"]
        for name, sec in prof.items():
            if not isinstance(sec, dict) or not sec:
                continue
            busy = "-" if _number(sec.get("gpu_busy")) is None else f"{sec['gpu_busy']:.0%}"
            top = "; ".join(f"`{str(t[0])[:48]}` {_fmt(t[1], '')}" for t in (sec.get("top") or [])[:3]
                            if isinstance(t, list) and len(t) == 3)
            if sec.get("error"):  # the section failed; the others stand
                top = str(sec["error"])[:120].replace("|", "/")
            lines.append(f"| {name} | {sec.get('wall_ms_per_step', '-')} | {busy} | {top} |")
    folder = doc.get("caption_folder")
    if isinstance(folder, dict) and folder:
        threads = folder.get("read_threads")
        lines += ["", f"| caption a folder of {folder.get('images')} JPEGs, warm API | img/s |", "|---|---|",
                  f"| files read one after another | {_fmt(folder.get('img_s_read_threads_0'), '')} |",
                  f"| the next batch's files read in {threads} threads meanwhile | "
                  f"{_fmt(folder.get(f'img_s_read_threads_{threads}'), '')} |"]
    if isinstance(doc.get("notes"), list) and doc["notes"]:
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="gpu.json from bench/gpu.py")
    args = ap.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.results}: {e}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict):
        print(f"error: {args.results} is not a gpu.json of bench/gpu.py (not a JSON object)", file=sys.stderr)
        return 2
    sys.stdout.write(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
