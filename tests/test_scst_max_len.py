"""--scst-max-len: the most words of an SCST sampled caption, a recorded training setting a resume keeps."""
from __future__ import annotations

import json

import pytest

import stage2_decoder.training.scst as scst
from stage2_decoder.training.checkpoint import CheckpointError
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.loop import train

TINY = dict(batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu",
            progress=False, epochs=1, scst_epochs=1)


def test_scst_samples_captions_of_the_configured_length(shared_cache, tmp_path, monkeypatch):
    seen = []
    real = scst.sample

    def spy(model, features, k, max_len):
        seen.append(max_len)
        ids, logp, mask = real(model, features, k, max_len)
        assert ids.shape[1] <= max_len
        return ids, logp, mask

    monkeypatch.setattr(scst, "sample", spy)
    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), scst_max_len=3, **TINY))
    assert seen == [3]
    assert json.loads((run / "config.json").read_text())["scst_max_len"] == 3
    with pytest.raises(CheckpointError, match="scst_max_len 3 -> 16"):  # changes the math: a resume refuses it
        train(TrainConfig(features=str(shared_cache), out=str(run), **{**TINY, "scst_epochs": 2}))


def test_scst_max_len_is_checked_and_offered_on_the_command_line(shared_cache, tmp_path, cli):
    with pytest.raises(ValueError, match="--scst-max-len"):
        train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), scst_max_len=0, **TINY))
    r = cli("stage2_decoder.train", "--help")
    assert "--scst-max-len" in r.stdout and "--ema-warmup" in r.stdout
