"""Sweep results: rank the runs and write results.csv/.md/.json (docs/sweeps.md)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from common.atomic import atomic_write
from stage2_decoder.reporting.curves import METRICS
from stage2_decoder.sweeps.grid import format_value


def write_json(path: Path, value) -> None:
    atomic_write(path, json.dumps(value, indent=1), what=path.name)


def rank_rows(rows: list[dict], metric: str) -> list[dict]:
    col, higher = METRICS[metric]

    def key(r):
        v = r.get(col)
        if r["status"] != "ok":
            return (2, 0.0, r["run"])
        if v is None:
            return (1, 0.0, r["run"])
        return (0, -v if higher else v, r["run"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def _columns(varied: list[str], metric: str) -> list[str]:
    first = ["val_cider", "val_loss"] if metric == "cider" else ["val_loss", "val_cider"]
    return ["rank", "run", "status", *first, "best_epoch", "epochs_run", "seconds", *varied, "checkpoint", "error"]


def _flat(row: dict, varied: list[str]) -> dict:
    return {**{k: v for k, v in row.items() if k != "params"}, **{k: row["params"].get(k) for k in varied}}


def format_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(out: Path, rows: list[dict], grid: dict[str, list], varied: list[str], metric: str) -> list[Path]:
    """results.csv, results.md and results.json in `out`, rows as ranked. Returns the paths."""
    cols = _columns(varied, metric)
    flat = [_flat(r, varied) for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    paths = [out / "results.csv", out / "results.md", out / "results.json"]
    atomic_write(paths[0], buf.getvalue(), what="results table")

    col, higher = METRICS[metric]
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Sweep: {len(rows)} runs, {n_ok} ok", "",
             f"Ranked by {col} ({'higher' if higher else 'lower'} is better)."
             + (f" Fixed: {', '.join(f'{k}={format_value(v)}' for k, v in fixed.items())}." if fixed else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in flat:
        cells = (format_cell(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(paths[1], "\n".join(lines) + "\n", what="results table")
    write_json(paths[2], {"metric": metric, "varied": varied, "fixed": fixed, "rows": rows})
    return paths
