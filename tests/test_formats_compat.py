"""A checkpoint and a feature cache written by the code of 3ddb13e (before stage2_decoder was laid out in
wings) still load: the layout changed code, not formats. tests/fixtures/format-3ddb13e/ holds a tiny
best.pt and features.h5 written by that code (a 4-image cache, a decoder of 16 hidden units)."""
from pathlib import Path

import h5py
import torch

from common.feature_cache import load_cache, read_meta
from stage2_decoder.decoding.captions import caption_keys
from stage2_decoder.training.checkpoint import load_checkpoint, model_from_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format-3ddb13e"
KEYS = ["139", "285", "632", "724"]


def test_a_cache_written_at_3ddb13e_loads_by_key():
    meta = read_meta(FIXTURES / "features.h5")
    assert (meta.backbone, meta.feature_dim, meta.dataset_format) == ("mobilenet_v2", 8, "coco")
    cache = load_cache(FIXTURES / "features.h5", backbone="mobilenet_v2", feature_dim=8, preprocess='{"crop": 224}')
    rows = cache.rows_by_key()
    assert sorted(rows) == sorted(KEYS)
    with h5py.File(FIXTURES / "features.h5", "r") as f:  # the same rows read straight from the file
        raw = f["features"][:]
    for k, r in rows.items():
        assert (cache.features[r] == raw[r]).all()


def test_a_checkpoint_written_at_3ddb13e_rebuilds_its_decoder_and_captions_the_cache():
    ckpt = load_checkpoint(FIXTURES / "best.pt")
    assert ckpt["split"]["test"] == ["724"] and ckpt["backbone"]["name"] == "mobilenet_v2"
    decoder, vocab = model_from_checkpoint(ckpt)
    stored = torch.load(FIXTURES / "best.pt", weights_only=True)["model_state"]
    state = decoder.state_dict()
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[k].cpu(), stored[k]) for k in state)  # the very tensors saved
    cache = load_cache(FIXTURES / "features.h5")
    rows = cache.rows_by_key()
    feats = torch.from_numpy(cache.features[[rows[k] for k in KEYS]]).float()
    captions = caption_keys(decoder, vocab, KEYS, feats)
    assert sorted(captions) == sorted(KEYS)
    words = set(vocab.itos)
    assert all(w in words for c in captions.values() for w in c.split())
