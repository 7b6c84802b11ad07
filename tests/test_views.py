"""Cached views (stage 1 --views, stage 2 --train-views): what each view is, how the cache stores
them (and still reads caches made before they existed), and how training draws them."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from common.backbones import load_image_u8, load_image_views, preprocess_for
from common.feature_cache import CacheError, load_cache, read_meta
from common.preprocess import VIEWS
from stage1_extract.cache_writer import CacheWriter
from stage1_extract.extract import ExtractConfig, extract
from stage2_decoder.training.pairs import CaptionPairs
from tests.test_cache import KEYS, _feats, _meta, _write_complete

MB_PP = preprocess_for("mobilenet_v2")


def test_views_of_one_photo(coco_records):
    path = coco_records[0].path
    v = load_image_views(path, MB_PP, len(VIEWS))
    assert v.shape == (4, 3, MB_PP.crop, MB_PP.crop) and v.dtype == torch.uint8
    assert torch.equal(v[0], load_image_u8(path, MB_PP))  # view 0 is the one captioning uses
    assert torch.equal(v[1], v[0].flip(-1)) and torch.equal(v[3], v[2].flip(-1))
    assert not torch.equal(v[2], v[0])  # the whole photo, not the centre crop
    assert torch.equal(load_image_views(path, MB_PP, 2), v[:2])
    with pytest.raises(ValueError):
        load_image_views(path, MB_PP, 5)


def test_cache_round_trip_with_views(tmp_path):
    out = tmp_path / "v.h5"
    meta = _meta(views=3)
    feats = _feats()
    views = np.random.default_rng(1).standard_normal((len(KEYS), 2, feats.shape[1])).astype(np.float32)
    w = CacheWriter(out, KEYS, meta)
    w.write(np.array([4, 1]), feats[[4, 1]], views=views[[4, 1]])  # rows out of order
    w.write(np.array([0, 2, 3]), feats[[0, 2, 3]], views=views[[0, 2, 3]])
    with pytest.raises(ValueError, match="views"):
        w.write(np.array([0]), feats[[0]])  # a 3-view cache needs the extra views
    w.finish()
    assert load_cache(out).views is None  # left on disk unless asked for
    c = load_cache(out, views=True)
    assert c.meta.views == 3
    np.testing.assert_array_equal(c.features, feats)
    np.testing.assert_array_equal(c.views, views)


def test_cache_from_before_views_reads_as_one_view(tmp_path):
    out = tmp_path / "old.h5"
    feats = _write_complete(out)
    with h5py.File(out, "a") as f:
        del f.attrs["views"]  # as every cache written before views existed
    assert read_meta(out).views == 1
    c = load_cache(out, views=True)
    assert c.views is None
    np.testing.assert_array_equal(c.features, feats)


def test_resuming_with_other_views_is_refused(tmp_path):
    out = tmp_path / "r.h5"
    w = CacheWriter(out, KEYS, _meta(views=2))
    w.write(np.array([0]), _feats(1), views=_feats(1)[:, None])
    w.close()
    with pytest.raises(CacheError, match="views"):
        CacheWriter(out, KEYS, _meta(views=1))


def test_extracted_views_are_the_encoded_views(coco_dir, mobilenet, tmp_path):
    out = tmp_path / "v4.h5"
    extract(ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(out),
                          backbone="mobilenet_v2", batch_size=3, workers=0, device="cpu", limit=4, views=4,
                          progress=False))
    c = load_cache(out, views=True)
    assert c.views.shape == (4, 3, mobilenet.feature_dim)
    from common.datasets import load_coco
    recs = {r.key: r for r in load_coco(coco_dir / "captions.json", coco_dir / "images")}
    key = c.keys[1]
    want = mobilenet.encode(load_image_views(recs[key].path, mobilenet.preprocess, 4)).numpy()
    got = np.concatenate([c.features[1][None], c.views[1]]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 cache
    # the centre view is what a one-view cache holds: views add, they do not change /features
    one = tmp_path / "v1.h5"
    extract(ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(one),
                          backbone="mobilenet_v2", batch_size=4, workers=0, device="cpu", limit=4, progress=False))
    np.testing.assert_allclose(load_cache(one).features.astype(np.float32), c.features.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_gather_draws_one_view_per_caption():
    from common.records import ImageRecord
    from common.vocab import build_vocab

    recs = [ImageRecord(key=str(i), image_id=i, path="", captions=["a dog runs", "a cat sits"]) for i in range(6)]
    vocab = build_vocab([c.split() for r in recs for c in r.captions], 1)
    pairs = CaptionPairs(recs, {r.key: i for i, r in enumerate(recs)}, vocab)
    V, N, D = 4, 6, 3
    feats = torch.arange(V, dtype=torch.float32).view(V, 1, 1).expand(V, N, D) * 10 + \
        torch.arange(N, dtype=torch.float32).view(1, N, 1)  # value = 10 * view + row
    idx = torch.arange(len(pairs))
    b = pairs.gather(idx, feats, torch.Generator().manual_seed(0))
    view, row = b.features[:, 0].div(10, rounding_mode="floor").long(), b.features[:, 0].remainder(10).long()
    assert torch.equal(row, pairs.rows[idx])  # each caption gets its own image, in some view
    assert (b.features == b.features[:, :1]).all()  # one view per caption, not mixed within a feature
    assert len(set(view.tolist())) > 1  # several views drawn
    again = pairs.gather(idx, feats, torch.Generator().manual_seed(0))
    assert torch.equal(again.features, b.features)  # seeded
    assert torch.equal(pairs.gather(idx, feats[0]).features, feats[0][pairs.rows])  # (N, D): as before


def _with_views(src, dst, views: np.ndarray):
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        f.create_dataset("views", data=views.astype(f["features"].dtype))
        f.attrs["views"] = views.shape[1] + 1


@pytest.fixture
def view_caches(shared_cache, tmp_path):
    """(same, other): the shared cache plus 3 extra views equal to the centre one (training must not
    change), or holding other images' features (training must change)."""
    feats = load_cache(shared_cache).features
    same, other = tmp_path / "same.h5", tmp_path / "other.h5"
    _with_views(shared_cache, same, np.repeat(feats[:, None], 3, axis=1))
    _with_views(shared_cache, other, np.repeat(np.roll(feats, 1, axis=0)[:, None], 3, axis=1))
    return same, other


def _train_tiny(cache, tmp_path, **kw) -> list[dict]:
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    r = train(TrainConfig(**{"features": str(cache), "out": str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"),
                             "epochs": 1, "scst_epochs": 0, "batch_size": 16, "val_images": 4, "dry_run": True,
                             "progress": False, **kw}))
    return r.history


def test_training_draws_the_cached_views(shared_cache, view_caches, tmp_path):
    same, other = view_caches

    def loss(cache, **kw):
        return _train_tiny(cache, tmp_path, **kw)[0]["train_loss"]

    base = loss(shared_cache)
    assert loss(same) == base
    assert loss(other) != base
    assert loss(other, train_views=False) == base  # --train-views false: the centre view only


def test_self_critical_training_gets_the_views_only_when_asked(view_caches, tmp_path, monkeypatch):
    import stage2_decoder.training.epochs as epochs

    shapes = []

    def fake_epoch(model, opt, features, *a, **kw):
        shapes.append(tuple(features.shape))
        return 0.5

    monkeypatch.setattr(epochs, "scst_epoch", fake_epoch)  # where the epoch function calls it
    _, other = view_caches
    for scst_views, train_views in ((False, True), (True, True), (True, False)):
        h = _train_tiny(other, tmp_path, scst_epochs=1, scst_views=scst_views, train_views=train_views)
        assert h[-1]["phase"] == "scst"
    n, d = load_cache(other).features.shape
    # --scst-views: the centre crop and the 3 cached views, whether cross-entropy draws them or not
    assert shapes == [(n, d), (4, n, d), (4, n, d)]


def test_scst_epoch_draws_one_view_per_image():
    import stage2_decoder.training.scst as scst

    n, v = 12, 4
    feats = (torch.arange(v)[:, None, None] * 100 + torch.arange(n)[None, :, None]).expand(v, n, 3).half()
    rows = {f"k{i}": i for i in range(n)}
    scorer = scst.CiderD({k: [["a"]] for k in rows})
    seen = []

    def fake_loss(model, f, keys, *a, **kw):
        seen.append((f, keys))
        return model.weight.sum() * 0, 1.0

    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scst, "scst_loss", fake_loss)
        scst.scst_epoch(model, opt, feats, rows, scorer, [], 5, torch.Generator().manual_seed(0))
        got = torch.cat([f for f, _ in seen])
        keys = [k for _, ks in seen for k in ks]
        assert got.dtype == torch.float32 and sorted(keys) == sorted(rows)  # every image once, as float32
        assert torch.equal(got[:, 0] % 100, torch.tensor([float(rows[k]) for k in keys]))  # its own image
        assert len(set((got[:, 0] // 100).tolist())) > 1 and (got == got[:, :1]).all()  # several views, one each
        seen.clear()
        scst.scst_epoch(model, opt, feats[0], rows, scorer, [], 5, torch.Generator().manual_seed(0))
        assert torch.equal(torch.cat([f for f, _ in seen])[:, 0], torch.tensor([float(rows[k]) for k in keys]))
