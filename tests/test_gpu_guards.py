"""CPU guards for the CUDA path: each checks, on the CPU, a property that a GPU run depends on
(cuDNN's training-mode RNN backward, fp32 LSTM under autocast, a step without host syncs, ...)."""
from __future__ import annotations

import torch
from click.testing import CliRunner
from torch import nn

from stage2_decoder.model import CaptionDecoder, DecoderConfig

TINY_CLI = ["--batch-size", "16", "--embed-size", "16", "--hidden-size", "32", "--vocab-threshold", "2",
            "--device", "cpu", "--no-progress", "--dry-run"]


def _decoder(**kw) -> CaptionDecoder:
    torch.manual_seed(0)
    return CaptionDecoder(DecoderConfig(**{**dict(feature_dim=32, vocab_size=40, embed_size=16, hidden_size=24,
                                                  num_layers=2, dropout=0.5, tie_embeddings=True), **kw}))


def test_no_gradient_flows_through_an_lstm_in_eval_mode_during_training_with_scst(shared_cache, tmp_path):
    """cuDNN refuses RNN backward in eval mode: every grad-enabled LSTM forward of a run (cross-entropy
    and SCST, through the real train CLI) must find the LSTM in training mode."""
    from stage2_decoder.train import main

    bad, grad_forwards = [], []

    def check(module, args):
        if isinstance(module, nn.LSTM) and torch.is_grad_enabled():
            grad_forwards.append(module.training)
            if not module.training:
                bad.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        r = CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--scst-epochs", "1", *TINY_CLI], catch_exceptions=False)
    finally:
        handle.remove()
    assert r.exit_code == 0, r.output
    assert grad_forwards, "no gradient-enabled LSTM forward seen: the hook did not run"
    assert not bad, f"{len(bad)} of {len(grad_forwards)} grad-enabled LSTM forwards in eval mode"


def test_scst_mode_freezes_batchnorm_and_switches_every_dropout_off():
    from stage2_decoder.scst import scst_mode

    m = _decoder()
    before = m.bn.running_mean.clone()
    with scst_mode(m):
        assert m.lstm.training and not m.bn.training and not m.drop.training and m.lstm.dropout == 0.0
        feats = torch.randn(6, 32)
        state = m.init_state(feats)
        a, _ = m.step(torch.ones(6, dtype=torch.long), state)
        b, _ = m.step(torch.ones(6, dtype=torch.long), state)
        assert torch.equal(a, b)  # no dropout anywhere
        a.sum().backward()
    assert torch.equal(m.bn.running_mean, before)
    assert m.lstm.dropout == 0.5  # restored for the next cross-entropy epoch


def test_the_lstm_runs_in_fp32_with_autocast_off_while_the_projections_stay_under_autocast():
    """On CUDA, autocast runs cuDNN's LSTM in fp16 (no loss scaling); CPU autocast stands in for it here."""
    m = _decoder()
    seen = []
    m.lstm.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].dtype, [s.dtype for s in (args[1] if len(args) > 1 and args[1] is not None else ())],
                                       torch.is_autocast_enabled("cpu"))))
    feats, inputs, lengths = torch.randn(4, 32), torch.randint(3, 40, (4, 7)), torch.tensor([7, 6, 5, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(feats, inputs, lengths)
        m.step(torch.ones(4, dtype=torch.long), m.init_state(feats))
    assert len(seen) == 3  # forward, init_state, step
    for x_dtype, state_dtypes, autocast_on in seen:
        assert x_dtype == torch.float32 and all(d == torch.float32 for d in state_dtypes)
        assert not autocast_on
    assert logits.dtype == torch.bfloat16  # the vocabulary projection keeps its autocast speed-up
