"""Stage 1 and stage 2 see the same features: what extraction cached for an image is what
captioning computes from the raw file (same backbone, same preprocessing, same weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.feature_cache import load_cache

N_CHECK = 5


@pytest.fixture(scope="module")
def shared_run(shared_cache, tmp_path_factory):
    """A briefly trained decoder checkpoint from the shared cache, through the importable train()."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path_factory.mktemp("consistency_run")
    # plain weights at a higher rate: the default 0.995 weight average over these ~50 steps is still mostly the
    # random start, whose outputs hardly depend on the image (and agreement would then prove little)
    result = train(TrainConfig(features=str(shared_cache), out=str(out), epochs=4, scst_epochs=0, batch_size=16, embed_size=32,
                               hidden_size=64, vocab_threshold=2, ema_decay=0.0, lr=3e-3, device="cpu", progress=False))
    assert result.epochs_run == 4
    assert (out / "best.pt").is_file()
    return out


def _live_features(cap, paths):
    """Raw files -> (B, D) features the way the captioner computes them (stage 1's preprocessing)."""
    from common.backbones import load_image_u8

    return cap.backbone.encode(torch.stack([load_image_u8(p, cap.backbone.preprocess) for p in paths]))


def _cached(cache_path, keys):
    c = load_cache(cache_path)
    rows = c.rows_by_key()
    return torch.from_numpy(c.features[[rows[k] for k in keys]].astype(np.float32))


def test_cached_features_equal_caption_time_features(shared_cache, shared_run, coco_records):
    from stage2_decoder import Captioner

    cap = Captioner.load(shared_run / "best.pt", device="cpu")
    assert cap.backbone.spec.name == "mobilenet_v2" and cap.backbone.weights == "IMAGENET1K_V1"
    picks = [coco_records[i] for i in (0, 7, 19, 30, 47)][:N_CHECK]
    live = _live_features(cap, [r.path for r in picks])
    cached = _cached(shared_cache, [r.key for r in picks])
    assert live.shape == cached.shape == (len(picks), 1280)
    # fp16 storage: relative error ~1e-3 of values up to ~10
    torch.testing.assert_close(live, cached, atol=1e-2, rtol=1e-2)
    # and it is a per-image match, not features that are all alike
    dists = torch.cdist(live, cached)
    assert (dists.argmin(1) == torch.arange(len(picks))).all()
    assert dists.diagonal().max() < 0.1 * dists.masked_fill(torch.eye(len(picks), dtype=torch.bool), 1e9).min()


def test_captions_from_cache_and_from_files_agree(shared_cache, shared_run, coco_records):
    """Decoding cached features and decoding features of the raw files gives the same captions."""
    from stage2_decoder import Captioner

    cap = Captioner.load(shared_run / "best.pt", device="cpu")
    picks = coco_records[:N_CHECK]
    files = cap.caption([r.path for r in picks], beam_size=1)
    cached = cap.caption_features(_cached(shared_cache, [r.key for r in picks]), beam_size=1)
    from_files, from_cache = [r["caption"] for r in files], [r["caption"] for r in cached]
    assert all(c.strip() for c in from_files)
    # image-dependent outputs, or agreement would prove nothing: a decoder trained this briefly may give
    # several images one caption, but not one log-probability
    file_scores = [r["captions"][0]["score"] for r in files]
    assert len(set(from_files)) > 1 or max(file_scores) - min(file_scores) > 0.05, (from_files, file_scores)
    assert sum(a == b for a, b in zip(from_files, from_cache)) >= N_CHECK - 1
    agree = [i for i in range(N_CHECK) if from_files[i] == from_cache[i]]
    for i in agree:  # same caption: the same score, up to the cache's float16 storage
        assert abs(files[i]["captions"][0]["score"] - cached[i]["captions"][0]["score"]) < 0.02


def test_random_weights_backbone_is_rebuilt_identically(flickr_dir, tmp_path):
    """`--weights none` is random but seeded: captioning rebuilds the very network extraction used."""
    from common.backbones import load_backbone, load_image_u8
    from stage1_extract.extract import ExtractConfig, extract

    out = tmp_path / "flickr2_resnet152_none.h5"
    extract(ExtractConfig(images=str(flickr_dir / "Images"), captions=str(flickr_dir / "captions.txt"),
                          out=str(out), backbone="resnet152", weights="none", batch_size=2, workers=0,
                          device="cpu", limit=2, dtype="float32", progress=False))
    c = load_cache(out, backbone="resnet152", feature_dim=2048)
    assert c.meta.weights == "none" and c.features.dtype == np.float32
    bb = load_backbone(c.meta.backbone, c.meta.weights, "cpu")
    paths = [str(flickr_dir / "Images" / k) for k in c.keys]
    live = bb.encode(torch.stack([load_image_u8(p, bb.preprocess) for p in paths]))
    torch.testing.assert_close(live, torch.from_numpy(c.features), atol=1e-4, rtol=1e-4)
