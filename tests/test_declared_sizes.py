"""Tiny hostile files never cost huge memory: declared sizes are checked before anything is allocated
(a cache's dataset headers against its file size, a checkpoint's decoder config against its stored
weights' shapes, a sweep grid's product size)."""
from __future__ import annotations

import h5py
import pytest
import torch

from common.feature_cache import CacheError, load_cache, read_keys


def _cache_declaring(shared_cache, path, rows: int):
    """A valid cache's attributes over datasets whose headers declare `rows` rows with no data behind them."""
    with h5py.File(shared_cache, "r") as src, h5py.File(path, "w") as f:
        f.attrs.update(dict(src.attrs))
        d = int(src.attrs["feature_dim"])
        f.create_dataset("features", (rows, d), dtype="float16")  # contiguous, allocated late: no bytes on disk
        f.create_dataset("keys", (rows,), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("status", (rows,), dtype="uint8")
        f.create_dataset("errors", (rows,), dtype=h5py.string_dtype("utf-8"))
    return path


def test_a_tiny_cache_declaring_many_rows_is_refused_before_reading(shared_cache, tmp_path):
    bad = _cache_declaring(shared_cache, tmp_path / "liar.h5", 50_000)
    assert bad.stat().st_size < 64 << 10
    with pytest.raises(CacheError, match=r"'features' declares \[50000, 1280\] \(122 MiB\) in a .* KiB file"):
        load_cache(bad)
    with pytest.raises(CacheError, match=r"declares"):
        read_keys(bad)


def test_a_checkpoint_declaring_a_huge_decoder_is_refused_before_building_it(tmp_path):
    from common.vocab import build_vocab
    from stage2_decoder.model import CaptionDecoder, DecoderConfig
    from stage2_decoder.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

    vocab = build_vocab([["a", "dog"]], threshold=1)
    path = tmp_path / "c.pt"
    save_checkpoint(path, CaptionDecoder(DecoderConfig(8, len(vocab), 4, 4)), vocab,
                    {"name": "x", "weights": "none", "feature_dim": 8, "preprocess": "{}"})
    ckpt = load_checkpoint(path)
    ckpt["decoder_config"]["hidden_size"] = 3000  # the stored tensors stay 4 wide
    with pytest.raises(CheckpointError, match=r"lstm.weight_ih_l0 is stored as \[16, 4\], the config needs \[12000, 4\]"):
        model_from_checkpoint(ckpt)
    ckpt["decoder_config"]["hidden_size"] = 4
    model, _ = model_from_checkpoint(ckpt)  # the true config still loads
    assert model.cfg.hidden_size == 4 and isinstance(model.lstm.weight_hh_l0, torch.Tensor)


def test_a_huge_sweep_grid_is_refused_before_expanding_with_a_hint(tmp_path):
    from stage2_decoder.sweeps.grid import SweepError, expand_grid, sample_grid

    grid = {"lr": [1e-4 * (i + 1) for i in range(10)], "batch_size": list(range(8, 18)),
            "hidden_size": list(range(16, 26)), "embed_size": list(range(16, 26)), "seed": list(range(10))}
    with pytest.raises(SweepError, match=r"100,000 points .*--random N"):
        expand_grid(grid)
    assert len(sample_grid(grid, 20)) == 20  # drawn by index, never built


def test_sweep_cli_refuses_a_huge_grid_in_one_line(shared_cache, tmp_path):
    import json

    from click.testing import CliRunner

    from reliability_helpers import one_error_line
    from stage2_decoder.sweep import main

    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"seed": list(range(1000)), "lr": [1e-3 * (i + 1) for i in range(100)]}))
    line = one_error_line(CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(tmp_path / "s"),
                                                    "--grid", str(grid), "--dry-run", "--no-progress"]))
    assert "100,000 points" in line and "--random" in line
    assert not (tmp_path / "s").exists()
