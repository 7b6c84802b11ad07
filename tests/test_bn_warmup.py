"""--bn-warmup: the projection's BatchNorm running statistics start as the plain average of the batches
seen, so a short run evaluates its embeddings centred and scaled as in training."""
from __future__ import annotations

import json

import numpy as np
import torch

from common.feature_cache import load_cache
from host_reads import HostReads
from stage2_decoder.model import CaptionDecoder, DecoderConfig, WarmBatchNorm1d
from stage2_decoder.training.checkpoint import load_checkpoint
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.loop import train


def _batches(n: int, dim: int = 6) -> list[torch.Tensor]:
    """Batches whose means and scales differ, as a projection's outputs do while it learns."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, dim, generator=g) * (1 + i % 3) + 2.0 * i for i in range(n)]


def test_the_first_batches_give_their_plain_average():
    bn = WarmBatchNorm1d(6, momentum=0.01).train()
    batches = _batches(5)
    for x in batches:
        bn(x)
    mean = torch.stack([x.mean(0) for x in batches]).mean(0)
    var = torch.stack([x.var(0) for x in batches]).mean(0)  # BatchNorm keeps the unbiased batch variance
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    plain = WarmBatchNorm1d(6, momentum=0.01, warmup=False).train()
    for x in batches:
        plain(x)
    # the fixed 0.01 from 0 and 1: under 5% of the way there (why a 60-step run captioned alike)
    assert (plain.running_mean / mean).abs().max() < 0.05


def test_from_one_over_momentum_batches_on_it_is_plain_batchnorm():
    warm = WarmBatchNorm1d(6, momentum=0.1).train()
    batches = _batches(14)
    for x in batches[:10]:
        warm(x)
    ref = torch.nn.BatchNorm1d(6, momentum=0.1).train()
    ref.load_state_dict(warm.state_dict())
    for x in batches[10:]:
        torch.testing.assert_close(warm(x), ref(x))
    assert warm.momentum == 0.1
    torch.testing.assert_close(warm.running_mean, ref.running_mean)
    torch.testing.assert_close(warm.running_var, ref.running_var)
    assert int(warm.num_batches_tracked) == 14


def test_a_loaded_count_goes_on_where_it_stopped():
    """A resume: the weights of the batches still to come follow the count last.pt saved, not 1, 1/2, ..."""
    batches = _batches(8)
    straight = WarmBatchNorm1d(6, momentum=0.01).train()
    for x in batches:
        straight(x)
    first = WarmBatchNorm1d(6, momentum=0.01).train()
    for x in batches[:5]:
        first(x)
    resumed = WarmBatchNorm1d(6, momentum=0.01).train()
    resumed(batches[0])  # a count of its own, which the load replaces
    resumed.load_state_dict(first.state_dict())
    for x in batches[5:]:
        resumed(x)
    torch.testing.assert_close(resumed.running_mean, straight.running_mean)
    torch.testing.assert_close(resumed.running_var, straight.running_var)


def test_a_training_step_reads_nothing_back_after_the_first():
    bn = WarmBatchNorm1d(6, momentum=0.01).train()
    batches = _batches(4)
    bn(batches[0])
    with HostReads() as reads:
        for x in batches[1:]:
            bn(x)
    assert reads.n == 0


def test_the_decoder_and_its_checkpoint_keys_are_as_before():
    m = CaptionDecoder(DecoderConfig(feature_dim=8, vocab_size=12, embed_size=6, hidden_size=10))
    assert isinstance(m.bn, torch.nn.BatchNorm1d) and m.bn.warmup
    keys = {k for k in m.state_dict() if k.startswith("bn.")}
    assert keys == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def _short_run_mean_error(shared_cache, run, warmup: bool) -> float:
    """~28 steps, no weight average: |saved running mean - mean of the saved projection of the training
    features| / |the latter|."""
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, scst_epochs=0, ema_decay=0.0,
                      bn_warmup=warmup, batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2,
                      device="cpu", progress=False, val_images=4))
    assert json.loads((run / "config.json").read_text())["bn_warmup"] is warmup
    state = load_checkpoint(run / "last.pt")["model_state"]
    assert int(state["bn.num_batches_tracked"]) >= 20
    train_keys = set(json.loads((run / "split.json").read_text())["train"])
    cache = load_cache(str(shared_cache))
    rows = sorted(r for k, r in cache.rows_by_key().items() if k in train_keys)
    x = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32))
    z = torch.nn.functional.linear(x, state["project.weight"], state["project.bias"])
    return ((state["bn.running_mean"] - z.mean(0)).norm() / z.mean(0).norm()).item()


def test_a_short_run_saves_statistics_near_its_projection(shared_cache, tmp_path):
    """Warm, the saved mean lags only the projection's own drift (~0.4 here); at 0.01 from zero it is still
    mostly its start (~0.8)."""
    warm = _short_run_mean_error(shared_cache, tmp_path / "warm", True)
    plain = _short_run_mean_error(shared_cache, tmp_path / "plain", False)
    assert plain > 0.7, plain
    assert warm < 0.6 * plain, (warm, plain)
