"""Decoder sweeps: grid expansion and sampling, names, a real 2-worker sweep with a failing setting,
resume, the results tables and plot, the CLI's errors, the Dask backend on a local cluster, the bench."""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stage2_decoder.reporting.curves import plot_sweep
from stage2_decoder.sweeps.grid import SweepError, expand_grid, normalize_grid, run_name, sample_grid
from stage2_decoder.sweeps.run import divergence
from stage2_decoder.sweeps.sweep import SweepConfig, plan_runs, run_sweep

REPO = Path(__file__).resolve().parents[1]
# tiny runs: one batch per epoch (dry_run), small decoder, few validation images
TINY = {"embed_size": 16, "epochs": 1, "val_images": 8, "scst_epochs": 0}


# --- grid ------------------------------------------------------------------------------------------------------

def test_expand_grid_is_the_product_in_file_order_with_fixed_values():
    pts = expand_grid({"lr": [0.001, 0.003], "hidden_size": [64, 128, 256], "epochs": 2})
    assert len(pts) == 6
    assert pts[0] == {"lr": 0.001, "hidden_size": 64, "epochs": 2}
    assert pts[1] == {"lr": 0.001, "hidden_size": 128, "epochs": 2}  # the last key varies fastest
    assert pts[-1] == {"lr": 0.003, "hidden_size": 256, "epochs": 2}
    assert len({json.dumps(p, sort_keys=True) for p in pts}) == 6
    # values take the TrainConfig field's type: an int lr becomes a float, 256.0 an int
    assert expand_grid({"lr": [1], "hidden_size": [256.0]}) == [{"lr": 1.0, "hidden_size": 256}]
    assert isinstance(expand_grid({"hidden_size": [256.0]})[0]["hidden_size"], int)


@pytest.mark.parametrize("grid, message", [
    ({"hiden_size": [64]}, "unknown grid key 'hiden_size': did you mean 'hidden_size'?"),
    ({"zzz": [1]}, "unknown grid key 'zzz': the training settings are "),
    ({"out": ["x"]}, "set by the sweep"),
    ({"lr": []}, "empty list"),
    ({"hidden_size": ["big"]}, "'big' for 'hidden_size' should be an integer"),
    ({"hidden_size": [64.5]}, "should be an integer"),
    ({"lr": [True]}, "should be a number"),
    ({"tie_embeddings": [1]}, "should be true or false"),
    # with --dry-run both points became one run in one folder, trained twice at once, listed twice as "ok"
    ({"dry_run": [True, False]}, "set by the sweep itself (--dry-run)"),
    ({"progress": [False]}, "set by the sweep itself (--no-progress)"),
    ({"lr": 10 ** 400}, "a huge integer for 'lr' is too large for a number"),  # was OverflowError
    ({"lr": [0.001, 0.001]}, "lists a value twice"),
    # was found only in train(), once per run, after the sweep had started the others
    ({"select_by": ["cider", "bleu"]}, "grid value 'bleu' for 'select_by' should be one of cider, loss"),
    ({"tokenizer": ["nltk", "wordpiece"]}, "'wordpiece' for 'tokenizer' should be one of nltk, whitespace, chars"),
    ({}, "non-empty JSON object"),
    ([1, 2], "non-empty JSON object"),
])
def test_bad_grids_are_refused_with_the_key_named(grid, message):
    with pytest.raises(SweepError) as e:
        normalize_grid(grid)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_grid_is_deterministic_distinct_and_from_the_product():
    grid = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "hidden_size": [128, 256, 512], "dropout": [0.0, 0.2, 0.5], "epochs": 3}
    full = expand_grid(grid)
    a, b = sample_grid(grid, 7, seed=1), sample_grid(grid, 7, seed=1)
    assert a == b and len(a) == 7
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 7
    assert all(p in full for p in a)
    assert [full.index(p) for p in a] == sorted(full.index(p) for p in a)  # product order
    assert sample_grid(grid, 7, seed=2) != a
    assert sample_grid(grid, 100, seed=0) == full  # asking for more than there is: all of it
    with pytest.raises(SweepError):
        sample_grid(grid, 0)


def test_random_points_of_a_grid_past_sys_maxsize():
    """The product of five lists of 10,000 values is past 2**63: `random.sample(range(total))` raised
    OverflowError, for the very --random N the oversized-grid error asks for."""
    grid = {k: list(range(1, 10_001)) for k in ("seed", "split_seed", "ema_start", "val_images", "length_buckets")}
    with pytest.raises(SweepError, match="draw some of them with --random N"):
        expand_grid(grid)
    points = sample_grid(grid, 3, seed=1)
    assert len(points) == 3 and points == sample_grid(grid, 3, seed=1) and points != sample_grid(grid, 3, seed=2)
    assert all(set(p) == set(grid) and all(1 <= v <= 10_000 for v in p.values()) for p in points)


def test_run_names_are_deterministic_safe_and_distinct(tmp_path):
    f = str(tmp_path / "c.h5")
    a = run_name({"lr": 0.001, "hidden_size": 512, "epochs": 3}, ["lr", "hidden_size"], f)
    assert a == run_name({"hidden_size": 512, "epochs": 3, "lr": 0.001}, ["lr", "hidden_size"], f)
    assert a.startswith("lr=0.001,hidden_size=512-")
    # a fixed setting that changes gives another run (nothing stale is reused), same readable part
    b = run_name({"lr": 0.001, "hidden_size": 512, "epochs": 4}, ["lr", "hidden_size"], f)
    assert b != a and b.split("-")[0] == a.split("-")[0]
    odd = run_name({"device": "cuda:0/x y"}, ["device"], f)
    assert "/" not in odd and " " not in odd
    assert run_name({"epochs": 3}, [], f).startswith("run-")


def test_divergence_is_read_from_the_history():
    ok = [{"epoch": 1, "train_loss": 4.2, "val_loss": 4.0}]
    assert divergence(ok) is None
    assert "val_loss is nan in epoch 2" in divergence(ok + [{"epoch": 2, "train_loss": 3.9, "val_loss": math.nan}])
    assert "train_loss is inf" in divergence([{"epoch": 1, "train_loss": math.inf, "val_loss": 4.0}])
    assert divergence([]) == "no epoch finished"
    # a self-critical epoch records a reward and no train loss: fine unless the reward is not finite
    scst = {"epoch": 2, "val_loss": 4.1, "phase": "scst", "train_reward": 0.03}
    assert divergence(ok + [scst]) is None
    assert "train_reward is nan" in divergence(ok + [{**scst, "train_reward": math.nan}])


# --- real sweeps on the shared 48-image cache ------------------------------------------------------------------

def _result_mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}


def test_two_worker_sweep_records_a_failure_ranks_resumes_and_plots(shared_cache, tmp_path):
    out = tmp_path / "sweep"
    # a threshold above every word's count is refused inside train(), by the data: a real failure of two runs
    # that must not stop the others
    grid = {"hidden_size": [16, 24], "vocab_threshold": [4, 1_000_000], **TINY}
    cfg = SweepConfig(features=str(shared_cache), out=str(out), grid=grid, n_jobs=2, threads=1, dry_run=True,
                      progress=False)
    r = run_sweep(cfg)
    assert (r.ran, r.skipped) == (4, 0)
    assert [x["status"] for x in r.rows] == ["ok", "ok", "failed", "failed"]
    ok, failed = r.rows[:2], r.rows[2:]
    assert all(x["params"]["vocab_threshold"] == 1_000_000 for x in failed)
    assert all(x["error"].startswith("ValueError: --vocab-threshold 1000000 leaves no word") for x in failed)
    assert {x["params"]["hidden_size"] for x in ok} == {16, 24} and all(x["params"]["vocab_threshold"] == 4 for x in ok)
    assert ok[0]["val_cider"] >= ok[1]["val_cider"]  # ranked by validation CIDEr, best first
    assert [x["rank"] for x in r.rows] == [1, 2, 3, 4]
    for x in ok:
        assert Path(x["checkpoint"]).is_file() and x["checkpoint"].startswith(str(out))
        assert math.isfinite(x["val_loss"]) and x["best_epoch"] == 1 and x["epochs_run"] == 1
    assert r.best == ok[0]
    # the runs ran at the same time in two processes other than this one
    a, b = ok
    assert a["pid"] != b["pid"]
    assert a["started_at"] < b["started_at"] + b["seconds"] and b["started_at"] < a["started_at"] + a["seconds"]

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == [x["run"] for x in r.rows]
    assert {"rank", "status", "val_cider", "val_loss", "hidden_size", "vocab_threshold", "checkpoint", "error"} <= set(table[0])
    assert [t["hidden_size"] for t in table[:2]] == [str(x["params"]["hidden_size"]) for x in ok]
    assert table[3]["error"].startswith("ValueError: --vocab-threshold") and table[0]["error"] == ""
    assert float(table[0]["val_cider"]) == pytest.approx(ok[0]["val_cider"])
    md = (out / "results.md").read_text()
    assert "Ranked by val_cider (higher is better)" in md and "Fixed: embed_size=16, epochs=1, val_images=8, scst_epochs=0" in md
    assert md.index(ok[0]["run"]) < md.index(ok[1]["run"]) < md.index(failed[0]["run"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and r.plot == str(out / "sweep.png")
    assert json.loads((out / "sweep.json").read_text())["varied"] == ["hidden_size", "vocab_threshold"]

    # rerun: every run has its result.json (ok or failed) -> nothing is trained again
    before = _result_mtimes(out)
    r2 = run_sweep(cfg)
    assert (r2.ran, r2.skipped) == (0, 4) and _result_mtimes(out) == before
    assert [x["run"] for x in r2.rows] == [x["run"] for x in r.rows]
    # an unfinished run (no result.json) is redone, the others are kept
    (Path(ok[1]["checkpoint"]).parent / "result.json").unlink()
    r3 = run_sweep(cfg)
    assert (r3.ran, r3.skipped) == (1, 3)
    after = _result_mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} == {ok[1]["run"]}
    # failed runs are redone only when asked
    r4 = run_sweep(replace(cfg, retry_failed=True))
    assert (r4.ran, r4.skipped) == (2, 2) and len(r4.failed) == 2

    # stage2_decoder.plot hands a sweep directory to plot_sweep
    from stage2_decoder.reporting.curves import plot_path

    assert plot_path(out) == [out / "sweep.png"] and plot_sweep(out, tmp_path / "again.png").is_file()


def test_metric_loss_ranks_ascending_and_picks_best_by_loss(shared_cache, tmp_path):
    out = tmp_path / "sweep"
    r = run_sweep(SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [0.001, 0.01], **TINY},
                              n_jobs=1, threads=1, metric="loss", dry_run=True, progress=False, plot=False))
    losses = [x["val_loss"] for x in r.rows]
    assert losses == sorted(losses) and all(x["status"] == "ok" for x in r.rows)
    assert all(x["params"]["select_by"] == "loss" for x in r.rows)
    assert json.loads((Path(r.rows[0]["checkpoint"]).parent / "config.json").read_text())["select_by"] == "loss"
    head = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert head.index("val_loss") < head.index("val_cider")
    assert not (out / "sweep.png").exists()


def test_a_run_the_machine_failed_is_resumed_by_the_next_sweep(shared_cache, tmp_path, monkeypatch):
    """A full disk or a killed run process was recorded as the run's failure: once space was freed, the
    same command said '2 already finished, 2 failed' and trained nothing (only --retry-failed did)."""
    import errno

    import stage2_decoder.sweeps.run as sweep_run
    from stage2_decoder.sweeps.grid import RunSpec

    cfg = SweepConfig(features=str(shared_cache), out=str(tmp_path / "sweep"), grid={"lr": [0.001, 0.01], **TINY},
                      n_jobs=1, threads=1, dry_run=True, progress=False, plot=False)
    real = sweep_run.train

    def disk_full(c):
        if "lr=0.01" in c.out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(c)

    monkeypatch.setattr(sweep_run, "train", disk_full)  # forked runs inherit it
    first = run_sweep(cfg)
    assert [x["status"] for x in first.rows] == ["ok", "failed"] and "No space left" in first.failed[0]["error"]
    monkeypatch.setattr(sweep_run, "train", real)  # space freed
    again = run_sweep(cfg)
    assert (again.ran, again.skipped) == (1, 1) and all(x["status"] == "ok" for x in again.rows)
    # a failure of the settings stays recorded until --retry-failed; a killed process is the machine's
    spec = RunSpec("r", str(tmp_path / "r"), str(shared_cache), {})
    killed, crashed = sweep_run.exit_record(spec, -9), sweep_run.exit_record(spec, 1)
    assert killed["machine_failure"] is True and "SIGKILL" in killed["error"]
    assert crashed["machine_failure"] is False


def test_a_resumed_run_keeps_the_torch_threads_it_started_with(cli, shared_cache, tmp_path):
    """A rerun with fewer runs left gave each more threads (cores // runs at once), so a resumed run summed
    in another order and ended unlike the uninterrupted sweep's. Through the CLI: a sweep forks its runs
    before any torch op of its own, and a run on 2 threads forked from this test process, whose OpenMP
    pool is already started, would hang."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"lr": [0.001, 0.01], **TINY}))
    out = tmp_path / "sweep"

    def sweep(threads):
        p = cli("stage2_decoder.sweep", "--features", shared_cache, "--out", out, "--grid", grid, "--n-jobs", "1",
                "--threads", threads, "--dry-run", "--no-progress", timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
        return sorted(d for d in out.iterdir() if d.is_dir())

    resumed, fresh = sweep(1)
    (resumed / "result.json").unlink()  # unfinished, its last.pt kept
    for name in ("result.json", "last.pt", "best.pt"):
        (fresh / name).unlink()  # not begun
    sweep(2)
    assert json.loads((resumed / "params.json").read_text())["threads"] == 1
    assert json.loads((fresh / "params.json").read_text())["threads"] == 2


def test_a_widened_grid_reuses_the_runs_it_already_finished(shared_cache, tmp_path):
    """A setting that went from fixed to varied renamed every run's folder (the varied settings are in the
    name), so each finished run was trained again under its new name."""
    out = tmp_path / "sweep"
    cfg = SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [0.001, 0.01], **TINY, "hidden_size": 32},
                      n_jobs=1, threads=1, dry_run=True, progress=False, plot=False)
    first = run_sweep(cfg)
    assert first.ran == 2 and first.skipped == 0
    before = {p.name for p in out.iterdir() if p.is_dir()}
    wider = run_sweep(replace(cfg, grid={**cfg.grid, "hidden_size": [32, 48]}))
    assert wider.ran == 2 and wider.skipped == 2
    after = {p.name for p in out.iterdir() if p.is_dir()}
    assert before < after and len(after) == 4
    assert sorted(r["run"] for r in wider.rows if r["params"]["hidden_size"] == 32) == sorted(before)


def test_a_setting_spelt_at_its_default_is_the_run_it_leaves_out(shared_cache, tmp_path):
    """`"dropout": 0.5` (the default) added to a grid gave every run another hash: each finished run was
    trained again in a second folder. Folders named by that hash before are found again too."""
    from stage2_decoder.training.config import TrainConfig

    out = tmp_path / "sweep"
    cfg = SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [0.001], **TINY}, n_jobs=1, threads=1,
                      dry_run=True, progress=False, plot=False)
    assert run_sweep(cfg).ran == 1
    spelt = replace(cfg, grid={**cfg.grid, "dropout": TrainConfig.dropout, "device": "auto"})
    again = run_sweep(spelt)
    assert (again.ran, again.skipped) == (0, 1) and len([p for p in out.iterdir() if p.is_dir()]) == 1
    # a folder named by the hash of every setting as spelt, defaults included
    spec = plan_runs(spelt)[0][0]
    old_name = run_name(spec.params, [], str(shared_cache), spelt=True)
    assert old_name != spec.name
    Path(spec.run_dir).rename(out / old_name)
    found = plan_runs(spelt)[0][0]
    assert found.name == old_name and run_sweep(spelt).skipped == 1


def test_a_run_trained_on_by_hand_is_not_reported_from_its_old_result(shared_cache, tmp_path):
    """`train` went on in a sweep's run folder (more epochs): the sweep still ranked it by its old result.json,
    numbers its best.pt no longer held."""
    from stage2_decoder.sweeps.run import read_result
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path / "sweep"
    cfg = SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [0.001], **TINY}, n_jobs=1, threads=1,
                      dry_run=True, progress=False, plot=False)
    run_sweep(cfg)
    spec = plan_runs(cfg)[0][0]
    assert read_result(spec) is not None
    train(TrainConfig(features=str(shared_cache), out=spec.run_dir, progress=False,
                      **{**spec.params, "epochs": 2}))
    assert read_result(spec) is None  # the sweep runs it again: its resume says what happened to the folder


def test_a_hand_edited_result_with_a_huge_number_is_redone_not_a_traceback(shared_cache, tmp_path):
    from stage2_decoder.sweeps.run import read_result

    out = tmp_path / "sweep"
    cfg = SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [0.001], **TINY}, n_jobs=1, threads=1,
                      dry_run=True, progress=False, plot=False)
    run_sweep(cfg)
    specs = plan_runs(cfg)[0]
    result = Path(specs[0].run_dir) / "result.json"
    rec = json.loads(result.read_text())
    assert read_result(specs[0]) == rec
    result.write_text(json.dumps({**rec, "seconds": 10 ** 400}))
    assert read_result(specs[0]) is None  # was OverflowError from math.isfinite


def test_sweep_refuses_a_missing_cache_before_running_anything(tmp_path):
    from common.feature_cache import CacheError

    with pytest.raises(CacheError, match="not found"):
        run_sweep(SweepConfig(features=str(tmp_path / "none.h5"), out=str(tmp_path / "s"), grid={"lr": [0.001]}))
    assert not (tmp_path / "s").exists()


def test_a_point_no_run_could_train_is_refused_before_any_run_starts(shared_cache, tmp_path):
    # each value is fine alone; together the LSTM is 15 GiB: train() refused it, one run at a time, mid-sweep
    grid = {"hidden_size": [16, 8192], "num_layers": [1, 8], **TINY}
    with pytest.raises(SweepError, match="grid point hidden_size=8192, num_layers=8, .*: --hidden-size 8192 .*the LSTM"):
        run_sweep(SweepConfig(features=str(shared_cache), out=str(tmp_path / "s"), grid=grid, dry_run=True,
                              progress=False))
    assert not (tmp_path / "s").exists()


def test_a_run_folder_a_train_by_hand_holds_is_left_untouched_and_redone_later(shared_cache, tmp_path):
    """The sweep wrote params.json (the threads a resume reads) and a failed result.json, with a traceback in
    train.log, into a folder another `train` owned; that run then finished fine and the sweep still said failed."""
    import os

    from common.lock import LOCK_NAME, hold

    cfg = SweepConfig(features=str(shared_cache), out=str(tmp_path / "s"), grid={"hidden_size": [16, 24], **TINY},
                      n_jobs=1, threads=1, dry_run=True, progress=False, plot=False)
    busy = Path(plan_runs(cfg)[0][1].run_dir)
    busy.mkdir(parents=True)
    with hold(busy / LOCK_NAME, "run folder"):  # as a `train --out` of that folder, started by hand
        r = run_sweep(cfg)
    assert [x["status"] for x in r.rows] == ["ok", "failed"]
    assert r.rows[1]["error"].startswith(f"OutputBusy: run folder {busy} is in use by process {os.getpid()}")
    assert sorted(p.name for p in busy.iterdir()) == [LOCK_NAME, "train.log"]  # no params.json, no result.json
    assert "Traceback" not in (busy / "train.log").read_text()
    r2 = run_sweep(cfg)  # the folder is free: the run is redone without --retry-failed
    assert (r2.ran, r2.skipped) == (1, 1) and [x["status"] for x in r2.rows] == ["ok", "ok"]


def test_cli_bad_grid_is_one_error_line(cli, shared_cache, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"hiden_size": [64, 128]}))
    p = cli("stage2_decoder.sweep", "--features", shared_cache, "--out", tmp_path / "s", "--grid", grid)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().startswith("error: unknown grid key 'hiden_size'")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    grid.write_text("{not json")
    p = cli("stage2_decoder.sweep", "--features", shared_cache, "--out", tmp_path / "s", "--grid", grid)
    assert p.returncode == 1 and "is not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_dask_backend_on_a_local_cluster(cli, shared_cache, tmp_path):
    import distributed
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"hidden_size": [16, 24], **TINY}))
    out = tmp_path / "sweep"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
        p = cli("stage2_decoder.sweep", "--features", shared_cache, "--out", out, "--grid", grid, "--dry-run",
                "--backend", "dask", "--scheduler", cluster.scheduler_address, "--no-progress", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "best: hidden_size=" in p.stdout and "checkpoint: " in p.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {r["worker_pid"] for r in rows} <= worker_pids  # sent to the Dask workers
    for r in rows:  # and each run's own result.json says so too (docs/sweeps.md)
        assert json.loads((out / r["run"] / "result.json").read_text())["worker_pid"] == r["worker_pid"]
    assert not {r["pid"] for r in rows} & worker_pids  # each trained in a process of its own
    assert all(Path(r["checkpoint"]).is_file() for r in rows)


def test_a_dask_run_gives_the_same_result_alone_and_beside_another(shared_cache, tmp_path):
    """Dask runs tasks as threads of one worker process; a run seeds torch's global generators (dropout draws
    from them), so two runs side by side in one process would draw from each other's. Each runs in its own."""
    import distributed
    import torch

    from stage2_decoder.sweeps.grid import RunSpec
    from stage2_decoder.sweeps.run import run_dask
    from stage2_decoder.training.checkpoint import load_checkpoint

    class Bar:
        def update(self, n=1):
            pass

    params = {"embed_size": 16, "hidden_size": 16, "batch_size": 32, "epochs": 1, "val_images": 8, "scst_epochs": 0,
              "val_beam_size": 1, "device": "cpu"}  # dropout 0.5 on: a few batches of random masks

    def spec(name, **more):
        return RunSpec(name, str(tmp_path / name), str(shared_cache), {**params, **more})

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        alone = run_dask([spec("alone")], Bar(), cluster.scheduler_address, 1)["alone"]
        both = run_dask([spec("beside"), spec("other", hidden_size=24)], Bar(), cluster.scheduler_address, 1)
    beside = both["beside"]
    assert alone["status"] == beside["status"] == both["other"]["status"] == "ok", (alone, both)
    assert alone["pid"] != beside["pid"] and alone["worker_pid"] == beside["worker_pid"]
    # the same computation in a fresh process each time: bit for bit
    assert (alone["val_loss"], alone["val_cider"]) == (beside["val_loss"], beside["val_cider"])
    a, b = (load_checkpoint(tmp_path / n / "last.pt")["model_state"] for n in ("alone", "beside"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two sweep processes and a CNN: ~30 s of CPU
def test_bench_tiny_prints_the_comparison(shared_cache, tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, str(REPO / "bench" / "sweep.py"), "--tiny", "--features", str(shared_cache),
                        "--work", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for line in ("sequential n_jobs=1", "parallel   n_jobs=2", "speed-up n_jobs=2 vs sequential:",
                 "peak memory parallel / sequential:", "seed end-to-end with mobilenet_v2"):
        assert line in out, out
    seq = next(ln for ln in out.splitlines() if ln.startswith("sequential"))
    assert float(seq.split("peak memory ")[1].split(" MB")[0]) > 100  # a torch process at least


SWEEP_AFTER_TORCH_WORK = """
import sys, torch
from stage2_decoder.sweeps.run import _may_fork
from stage2_decoder.sweeps.sweep import SweepConfig, run_sweep
before = _may_fork(2)
torch.set_num_threads(2)
x = torch.randn(800, 800)
for _ in range(3):
    (x @ x).sum()  # the OpenMP pool runs in this process
after = _may_fork(2)
r = run_sweep(SweepConfig(features=sys.argv[1], out=sys.argv[2], grid={"lr": [0.001], **TINY}, n_jobs=1, threads=2,
                          dry_run=True, progress=False, plot=False))
print(before, after, [row["status"] for row in r.rows])
"""


def test_a_sweep_started_from_python_after_torch_work_does_not_hang(shared_cache, tmp_path):
    """A notebook that trains, then sweeps: a run forked from a process whose OpenMP pool has run hung forever
    in its first parallel op (GNU OpenMP is not fork-safe). Such a run now starts in a fresh interpreter; the
    script has no __main__ guard, which multiprocessing's spawn would need."""
    import subprocess

    p = subprocess.run([sys.executable, "-c", f"TINY = {TINY!r}\n{SWEEP_AFTER_TORCH_WORK}", str(shared_cache),
                        str(tmp_path / "sweep")], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    before, after, statuses = p.stdout.split(maxsplit=2)
    assert (before, after) == ("True", "False")  # a process that has run no torch op still forks its runs
    assert statuses.strip() == "['ok']"


FRESH_RUN_THEN_DIE = """
import os, signal, sys, time
from stage2_decoder.sweeps.grid import RunSpec
from stage2_decoder.sweeps.run import _FreshRun
spec = RunSpec(name="r", run_dir=sys.argv[2], features=sys.argv[1], params={"lr": 0.001, **TINY})
os.makedirs(sys.argv[2])
run = _FreshRun(spec, 1, None)
run.start()
print(run.proc.pid, flush=True)
time.sleep(0.3)  # the run is still importing torch
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_fresh_run_dies_with_a_sweep_killed_while_it_starts(shared_cache, tmp_path):
    """The sweep's pid was not passed on: a run whose sweep was killed before the run armed its parent-death
    signal went on training as an orphan, and would collide with the rerun."""
    import os
    import subprocess
    import time

    p = subprocess.run([sys.executable, "-c", f"TINY = {TINY!r}\n{FRESH_RUN_THEN_DIE}", str(shared_cache),
                        str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True, timeout=60)
    pid = int(p.stdout.split()[0])
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.2)
    alive = os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    if alive:
        os.kill(pid, 9)
    assert not alive and not (tmp_path / "r" / "result.json").exists()


def test_a_sweep_out_that_is_a_file_is_said_so(shared_cache, tmp_path):
    """It was "[Errno 17] File exists"."""
    (tmp_path / "taken").write_text("")
    with pytest.raises(SweepError, match="is a file, not a folder"):
        run_sweep(SweepConfig(features=str(shared_cache), out=str(tmp_path / "taken"), grid={"lr": [0.001], **TINY},
                              progress=False, plot=False))
