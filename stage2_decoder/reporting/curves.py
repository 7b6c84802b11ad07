"""Training curves (RUN_DIR/curves.png) and sweep plots (sweep.png), drawn headless with matplotlib.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from common.atomic import atomic_path, remove_stale_temporaries
from common.lock import hold
from common.jsonio import JSONFileError, finite_number, iter_jsonl, read_json


CURVES_NAME = "curves.png"


CURVES_SIZE = (1500, 450)  # px of curves.png


DPI = 100


METRICS = {"cider": ("val_cider", True), "loss": ("val_loss", False)}  # a sweep's ranking: column, higher is better


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch records of RUN_DIR/metrics.jsonl, one per epoch (the last line wins), by epoch."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    by_epoch = {}
    for n, rec in iter_jsonl(path, "metrics file", expect=dict):
        epoch = rec.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch <= 10**9:
            raise ValueError(f"{path} line {n} is not a metrics record: its epoch is {repr(epoch)[:40]}, "
                             f"expected a positive integer")
        by_epoch[epoch] = rec
    if not by_epoch:
        raise ValueError(f"{path} has no epochs yet: nothing to plot")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _short(value) -> str:
    return "an integer of hundreds of digits" if isinstance(value, int) and abs(value) > 2 ** 1000 else \
        repr(str(value)[:40])


def _series(records: list[dict], key: str, fn=None) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = finite_number(r.get(key))
        if v is not None:
            xs.append(r["epoch"])
            ys.append(fn(v) if fn else v)
    return xs, ys


def run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json ({} if missing or unreadable: the plot then assumes the defaults of old runs)."""
    try:
        return read_json(run_dir / "config.json", "run config", expect=dict)
    except (OSError, JSONFileError):
        return {}


def marked_best_epoch(config: dict, records: list[dict]) -> int | None:
    """The epoch best.pt holds, without loading torch: the last one its metrics.jsonl line says became
    the best; in a run from before that flag, by the run's --select-by rule (its config.json) on the
    rounded scores the lines hold."""
    flagged = [r["epoch"] for r in records if r.get("best") is True]
    if flagged:
        return flagged[-1]
    select_by = config.get("select_by", "cider")
    key, sign = ("val_cider", 1) if select_by == "cider" else ("val_loss", -1)
    scored = [(sign * v, -epoch) for epoch, v in zip(*_series(records, key))]
    return -max(scored)[1] if scored else None  # ties: the earliest epoch, as train.py keeps the first best


CURVES_WAIT_S = 60  # a drawing takes a second or two; a drawer stopped (Ctrl-Z) must not hang the run's end


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw RUN_DIR's metrics.jsonl into `out` (default RUN_DIR/curves.png), atomically. Returns the path.

    One drawing of `out` at a time (a lock beside it, waited for up to CURVES_WAIT_S): `plot` during a run and the
    run's own drawing take turns, each reading the metrics in its turn, so the last one written shows the most
    epochs."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / CURVES_NAME
    with hold(out.parent / f".{out.name}.lock", "curves", wait=CURVES_WAIT_S):
        remove_stale_temporaries(out.parent, [out.name])  # a killed drawing's: no other is live now
        return _draw_run(run_dir, out)


def _draw_run(run_dir: Path, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    records = read_metrics(run_dir)
    config = run_config(run_dir)
    best = marked_best_epoch(config, records)
    w, h = CURVES_SIZE
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl, ax_cider = fig.subplots(1, 3)
    style = {"marker": "o", "markersize": 4}  # a 1-epoch run still shows its points
    ax_loss.plot(*_series(records, "train_loss"), label="train", **style)
    ax_loss.plot(*_series(records, "val_loss"), label="validation", **style)
    ax_loss.set(title="loss (cross-entropy per word)", xlabel="epoch", ylabel="loss")
    # train perplexity is not recorded; exp(train loss) is it (capped like train.py caps val's)
    ax_ppl.plot(*_series(records, "train_loss", lambda v: math.exp(min(v, 50))), label="train", **style)
    ax_ppl.plot(*_series(records, "val_perplexity"), label="validation", **style)
    ax_ppl.set(title="perplexity", xlabel="epoch", ylabel="perplexity", yscale="log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 60, not 6x10^1
    ax_ppl.yaxis.set_major_formatter(plain)
    ax_ppl.yaxis.set_minor_formatter(plain)
    xs, ys = _series(records, "val_cider")
    if xs:
        beam = config.get("val_beam_size", 1)  # runs from before the setting decoded greedily
        # a hand-edited config.json: text there would be read as mathtext ("$...$") and fail the whole plot
        label = ("validation (greedy)" if beam == 1 else f"validation (beam {beam})" if type(beam) is int
                 else "validation")
        ax_cider.plot(xs, ys, color="tab:green", label=label, **style)
    else:
        ax_cider.text(0.5, 0.5, "no validation CIDEr recorded", ha="center", va="center",
                      transform=ax_cider.transAxes)
    ax_cider.set(title="validation CIDEr", xlabel="epoch", ylabel="CIDEr")
    for ax in (ax_loss, ax_ppl, ax_cider):
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best.pt (epoch {best})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.suptitle(f"{run_dir.resolve().name}: {len(records)} epochs")
    with atomic_path(out, what="curves") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out


def plot_sweep(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the metric against each varied setting from SWEEP_DIR/results.json into sweep.png (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily, no pyplot: no global backend state
    from matplotlib.figure import Figure

    sweep_dir = Path(sweep_dir)
    res = read_sweep_results(sweep_dir / "results.json")
    metric, varied = res["metric"], res["varied"] or ["run"]
    col, higher = METRICS[metric]
    ok = [r for r in res["rows"] if r["status"] == "ok" and r.get(col) is not None]
    fig = Figure(figsize=(4.2 * len(varied), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(varied), squeeze=False)[0]
    for ax, key in zip(axes, varied):
        xs = [r["params"].get(key) if key != "run" else r.get("run") for r in ok]
        ys = [r[col] for r in ok]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) and xs
        if numeric:
            levels = sorted(set(xs))
            if min(levels) > 0 and max(levels) / min(levels) >= 10:
                ax.set_xscale("log")  # learning rates and other settings swept by factors
            pos = xs
        else:  # strings, booleans: one slot per value, in the grid's order
            levels = list(dict.fromkeys(map(str, xs)))
            pos = [levels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(levels)), levels, rotation=30 if key == "run" else 0, fontsize=8)
        ax.scatter(pos, ys, alpha=0.6, label="runs")
        if levels:  # the mean over the other settings, per value of this one
            lv = levels if numeric else list(range(len(levels)))
            means = [sum(y for p, y in zip(pos, ys) if p == v) / max(1, sum(p == v for p in pos)) for v in lv]
            ax.plot(lv, means, color="tab:red", marker="_", label="mean")
        ax.set(xlabel=key, ylabel=col, title=f"{col} vs {key}")
        ax.grid(alpha=0.3)
    if not ok:
        axes[0].text(0.5, 0.5, "no finished run", ha="center", va="center", transform=axes[0].transAxes)
    elif len(ok) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{sweep_dir.resolve().name}: {len(ok)} of {len(res['rows'])} runs "
                 f"({'higher' if higher else 'lower'} {col} is better)")
    out = Path(out) if out is not None else sweep_dir / "sweep.png"
    with atomic_path(out, what="sweep plot") as tmp:
        fig.savefig(tmp, format="png")
    return out


def read_sweep_results(path: Path) -> dict:
    """SWEEP_DIR/results.json with every field the plot uses of its type; else one ValueError naming it."""
    try:
        res = read_json(path, "sweep results", expect=dict)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {path.parent} a sweep directory?") from None
    except JSONFileError as e:
        raise JSONFileError(f"{e}; rerun the sweep to rewrite it") from None
    rows, varied = res.get("rows"), res.get("varied")
    why = ("'metric' is not one of " + ", ".join(METRICS) if res.get("metric") not in METRICS else
           "'varied' is not a list of setting names" if not (isinstance(varied, list)
                                                             and all(isinstance(v, str) for v in varied)) else
           "'rows' is not a list of run objects" if not (isinstance(rows, list)
                                                         and all(isinstance(r, dict) for r in rows)) else None)
    col = METRICS.get(res.get("metric"), ("",))[0]
    for i, r in enumerate(rows if why is None else []):
        value = r.get(col)
        if not isinstance(r.get("status"), str) or not isinstance(r.get("params", {}), dict):
            why = f"rows[{i}] has no 'status' string or a 'params' that is not an object"
        elif value is not None and finite_number(value) is None:
            why = f"rows[{i}].{col} is {_short(value)}, not a finite number"
        if why:
            break
    if why:
        raise ValueError(f"sweep results {path} is damaged ({why}); rerun the sweep to rewrite it")
    res["rows"] = [{**r, "params": r.get("params", {})} for r in rows]
    return res


def _is_sweep_dir(path: Path) -> bool:
    """A sweep writes sweep.json and its results tables (results.csv/.json) beside its run directories."""
    return any((path / name).is_file() for name in ("sweep.json", "results.json", "results.csv"))


def dir_kind(path: str | os.PathLike) -> str:
    """"run" (it has metrics.jsonl) or "sweep"; anything else is refused with one line."""
    p = Path(path)
    if not p.is_dir():
        raise NotADirectoryError(f"{path} is not a directory (give a run or sweep directory)")
    if (p / "metrics.jsonl").is_file():
        return "run"
    if _is_sweep_dir(p):
        return "sweep"
    raise ValueError(f"{path} is neither a training run (no metrics.jsonl) nor a sweep directory (no results.csv)")


def plot_path(path: str | os.PathLike) -> list[Path]:
    """Curves for a run directory, or the sweep plot for a sweep directory. Returns the PNGs written."""
    return [plot_run(path) if dir_kind(path) == "run" else plot_sweep(path)]
