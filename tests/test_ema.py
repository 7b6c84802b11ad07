"""--ema-decay: the weights validated, selected and saved are a moving average of the trained ones, bias-
corrected (--ema-warmup) so a short run's average is not mostly its first steps, and begun after --ema-start
steps so it is not the weights of half-way through."""
from __future__ import annotations

import shutil

import torch
from torch import nn

from stage2_decoder.training.checkpoint import load_checkpoint
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.ema import EMA, warmed_decay
from stage2_decoder.training.loop import train

# averaging from the first step: a dry run takes one step per epoch
TINY = dict(batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu",
            progress=False, scst_epochs=0, ema_start=0)


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
    d = warmed_decay(decay, 1)  # the second update: 1 - 0.25 / (1 - 0.75 ** 2) = 3 / 7
    assert second["ema_updates"] == 2 and abs(d - 3 / 7) < 1e-12
    for k, v in second["model_state"].items():  # after step 2: d * w1 + (1 - d) * w2
        if v.is_floating_point():  # one lerp vs this expression: float32 rounding only
            torch.testing.assert_close(v, d * w1[k] + (1 - d) * w2[k], rtol=1e-5, atol=1e-6)

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


def _linear(value: float) -> nn.Linear:
    m = nn.Linear(4, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_a_short_run_average_is_mostly_the_trained_weights():
    """60 updates (a 400-photo, 4-epoch run): a constant 0.995 from the start would keep 0.995 ** 59 = 74% of
    the first weights; bias-corrected, the first step weighs as one of the 60 (0.005 * 0.995 ** 59 / (1 -
    0.995 ** 60), 1.4%)."""
    model = _linear(0.0)  # the weights after the first step
    ema = EMA(model, 0.995)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # where training went
    for _ in range(59):
        ema.update(model)
    assert ema.updates == 60
    first_share = 0.005 * 0.995 ** 59 / (1 - 0.995 ** 60)
    for p in ema.module.parameters():  # float32 lerps: a few ulps
        torch.testing.assert_close(p, torch.full_like(p, 1 - first_share), rtol=0, atol=1e-5)
        assert (p > 0.98).all()


def test_the_warm_up_is_the_bias_corrected_average_of_every_step():
    """After n updates the average is sum_i (1 - d) d ** (n - i) w_i / (1 - d ** n), computed here directly
    (in float64) against the module's float32 lerps: equal within float32 rounding, not bit for bit."""
    decay = 0.9
    model = _linear(0.0)
    ema = EMA(model, decay)
    steps = [float((7 * t) % 11) for t in range(40)]  # weights that go up and down
    for n, w in enumerate(steps, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(w)
        ema.update(model)
        want = sum((1 - decay) * decay ** (n - i) * wi for i, wi in enumerate(steps[:n], start=1)) / (1 - decay ** n)
        torch.testing.assert_close(ema.module.weight, torch.full((3, 4), want), rtol=1e-5, atol=1e-5)
    assert warmed_decay(0.9, 0) == 0.0  # the first update copies
    assert all(warmed_decay(0.995, t) < warmed_decay(0.995, t + 1) < 0.995 for t in (0, 10, 100, 1000))
    assert abs(warmed_decay(0.995, 2000) - 0.995) < 1e-6  # then the decay as set


def test_without_warm_up_the_decay_is_constant():
    model = _linear(0.0)
    ema = EMA(model, 0.5, warmup=False)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema.update(model)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((3, 4), 0.75), rtol=0, atol=0)  # exact in binary


def test_a_last_pt_from_before_the_counter_resumes_exactly(shared_cache, tmp_path):
    """A last.pt without "ema_updates" takes the count from Adam's steps (one update followed each): it
    ends where an uninterrupted run ends, bit for bit."""
    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, ema_decay=0.9, **TINY))
    old = torch.load(run / "last.pt", weights_only=True)
    assert old.pop("ema_updates") == 2
    torch.save(old, run / "last.pt")
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=4, ema_decay=0.9, **TINY))
    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "straight"), epochs=4, ema_decay=0.9, **TINY))
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 4
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])


def test_the_warm_up_is_a_recorded_setting_a_resume_keeps(shared_cache, tmp_path):
    import json

    import pytest

    from stage2_decoder.training.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, ema_warmup=False, **TINY))
    assert json.loads((run / "config.json").read_text())["ema_warmup"] is False
    with pytest.raises(CheckpointError, match="ema_warmup False -> True"):
        train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, **TINY))


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_before_its_start_the_average_is_the_trained_weights():
    """A 60-step run with the default start (200): every update copies, so the run saves what it trained.
    Averaged from step 0 instead, the same run saves about half-way's weights."""
    model, steps = _linear(0.0), [t / 59 for t in range(60)]  # weights that travel from 0 to 1
    late, early = EMA(model, 0.995, start=TrainConfig.ema_start), EMA(model, 0.995, start=0)
    for w in steps:
        _fill(model, w)
        late.update(model)
        early.update(model)
    assert late.updates == early.updates == 60
    assert all(torch.equal(a, b) for a, b in zip(late.module.parameters(), model.parameters()))
    assert 0.4 < float(early.module.weight[0, 0]) < 0.6  # the corrected average of every step: about the middle


def test_from_its_start_the_average_is_the_bias_corrected_average_of_the_steps_since():
    """After `start` copies, update start + n holds sum_i (1 - d) d ** (n - i) w_{start + i} / (1 - d ** n): the
    steps before the start have no share (computed here in float64, against float32 lerps)."""
    decay, start = 0.9, 5
    model = _linear(0.0)
    ema = EMA(model, decay, start=start)
    steps = [float((7 * t) % 11) for t in range(30)]
    for t, w in enumerate(steps, start=1):
        _fill(model, w)
        ema.update(model)
        since = steps[start:t]
        if not since:  # still following: a copy
            torch.testing.assert_close(ema.module.weight, torch.full((3, 4), w), rtol=0, atol=0)
            continue
        n = len(since)
        want = sum((1 - decay) * decay ** (n - i) * wi for i, wi in enumerate(since, start=1)) / (1 - decay ** n)
        torch.testing.assert_close(ema.module.weight, torch.full((3, 4), want), rtol=1e-5, atol=1e-5)


def test_the_start_is_recorded_and_a_resume_keeps_it(shared_cache, tmp_path):
    import json

    import pytest

    from stage2_decoder.training.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, **{**TINY, "ema_start": 3}))
    assert json.loads((run / "config.json").read_text())["ema_start"] == 3
    with pytest.raises(CheckpointError, match="ema_start 3 -> 0"):
        train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, **TINY))
    ckpt = load_checkpoint(run / "last.pt")  # one step, before the start: the saved average is the trained weights
    assert all(torch.equal(v, ckpt["train_model_state"][k]) for k, v in ckpt["model_state"].items())


def test_a_run_from_before_the_warm_ups_resumes_as_it_was_trained(shared_cache, tmp_path):
    """A last.pt whose settings predate --ema-warmup, --ema-start and --bn-warmup was trained without them:
    resuming it with today's defaults would change its math mid-run, so it is refused, naming each; with the
    old values it goes on."""
    import pytest

    from stage2_decoder.training.checkpoint import CheckpointError

    run = tmp_path / "run"
    old = dict(ema_warmup=False, bn_warmup=False)
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, **TINY, **old))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for k in ("ema_warmup", "ema_start", "bn_warmup"):
        del ckpt["train_config"][k]
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2,
                          **{**TINY, "ema_start": TrainConfig.ema_start}))
    for named in ("ema_warmup False -> True", "ema_start 0 -> 200", "bn_warmup False -> True"):
        assert named in str(e.value)
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, **TINY, **old))
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
