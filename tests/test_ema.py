"""--ema-decay: the weights validated, selected and saved are a moving average of the trained ones."""
from __future__ import annotations

import shutil

import torch

from stage2_decoder.checkpoint import load_checkpoint
from stage2_decoder.train import TrainConfig, train

TINY = dict(batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu",
            progress=False, scst_epochs=0)


def test_saved_weights_are_the_moving_average_and_a_resume_goes_on_exactly(shared_cache, tmp_path):
    decay = 0.75
    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, ema_decay=decay, **TINY))
    first = load_checkpoint(run / "last.pt")
    # one step (dry run): the average starts as a copy of the trained weights
    for k, v in first["model_state"].items():
        assert torch.equal(v, first["train_model_state"][k]), k
    shutil.copytree(run, tmp_path / "two")
    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "two"), epochs=2, ema_decay=decay, **TINY))
    second = load_checkpoint(tmp_path / "two" / "last.pt")
    w1, w2 = first["train_model_state"], second["train_model_state"]
    assert not torch.equal(w1["embed.weight"], w2["embed.weight"])
    for k, v in second["model_state"].items():  # after step 2: decay * w1 + (1 - decay) * w2
        if v.is_floating_point():
            torch.testing.assert_close(v, decay * w1[k] + (1 - decay) * w2[k], rtol=1e-5, atol=1e-6)

    # resumed after epoch 1, it ends where an uninterrupted run ends, average and trained weights alike
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=3, ema_decay=decay, **TINY))
    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "straight"), epochs=3, ema_decay=decay, **TINY))
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    for part in ("model_state", "train_model_state"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    # inference loads model_state: the average, not the last trained weights
    assert not torch.equal(a["model_state"]["embed.weight"], a["train_model_state"]["embed.weight"])


def test_without_ema_the_checkpoint_has_one_set_of_weights(shared_cache, tmp_path):
    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1, ema_decay=0.0, **TINY))
    assert "train_model_state" not in load_checkpoint(tmp_path / "run" / "last.pt")


def test_the_self_critical_phase_is_not_averaged(shared_cache, tmp_path):
    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1, ema_decay=0.5,
                      **{**TINY, "scst_epochs": 1}))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["history"][-1]["phase"] == "scst" and "train_model_state" not in ckpt
