"""Test-time views (DecodeConfig.views, `--views` of caption and evaluate): several views of an image
decoded as one, their next-word distributions averaged, from the cache and from raw photos alike."""
from __future__ import annotations

import pytest
import torch

from stage2_decoder.decode import DecodeConfig, ViewEnsemble, beam_search_nbest, decode, greedy
from stage2_decoder.model import CaptionDecoder, DecoderConfig

V, D = 12, 16


def _model(seed: int, layers: int = 1) -> CaptionDecoder:
    torch.manual_seed(seed)
    m = CaptionDecoder(DecoderConfig(D, V, embed_size=8, hidden_size=16, num_layers=layers))
    with torch.no_grad():
        m.out.weight.mul_(6.0)  # peaky, image-dependent distributions
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_copies_of_one_view_decode_as_that_view(layers):
    model, feats = _model(layers, layers), torch.randn(4, D)
    copies = feats[:, None].expand(4, 3, D)
    assert greedy(model, copies, 10) == greedy(model, feats, 10)
    cfg = DecodeConfig(beam_size=3, max_len=10)
    for one, many in zip(beam_search_nbest(model, feats, cfg), beam_search_nbest(model, copies, cfg)):
        assert [ids for ids, _ in one] == [ids for ids, _ in many]
        assert [s for _, s in one] == pytest.approx([s for _, s in many], abs=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
@torch.no_grad()
def test_each_step_is_the_mean_of_the_views_distributions(layers):
    model, feats = _model(7, layers), torch.randn(3, 2, D)  # 3 images, 2 different views each
    ens = ViewEnsemble(model, 2)
    state = ens.init_state(feats)
    single = [model.init_state(feats[:, v]) for v in range(2)]
    tokens = torch.tensor([1, 1, 1])
    for word in ([4, 5, 6], [7, 3, 9], None):
        logp, state = ens.step(tokens, state)
        outs = [model.step(tokens, s) for s in single]
        want = torch.log((outs[0][0].exp() + outs[1][0].exp()) / 2)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(logp))
        torch.testing.assert_close(logp[finite], want[finite], atol=1e-5, rtol=1e-5)
        assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-5)  # still a distribution
        if word is not None:
            tokens, single = torch.tensor(word), [s for _, s in outs]


def test_views_change_the_caption_and_beam_of_one_is_greedy():
    model = _model(3)
    feats = torch.randn(16, 2, D)
    ensemble = greedy(model, feats, 10)
    assert ensemble != greedy(model, feats[:, 0], 10)  # the second view is really used
    assert [h[0][0] for h in beam_search_nbest(model, feats, DecodeConfig(1, 10, 0, 0.0))] == ensemble
    assert decode(model, feats, DecodeConfig(beam_size=1, max_len=10, min_len=0)) == ensemble


# --- from the cache and from raw photos ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def views_run(coco_dir, tmp_path_factory):
    """A 4-view cache of 16 COCO photos and a tiny decoder trained on it (half the photos in val/test)."""
    from stage1_extract.extract import ExtractConfig, extract
    from stage2_decoder.train import TrainConfig, train

    d = tmp_path_factory.mktemp("tta")
    cache = d / "v4.h5"
    extract(ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(cache),
                          backbone="mobilenet_v2", batch_size=8, workers=0, device="cpu", limit=16, views=4,
                          progress=False))
    train(TrainConfig(features=str(cache), out=str(d / "run"), epochs=1, scst_epochs=0, batch_size=16,
                      embed_size=16, hidden_size=32, vocab_threshold=1, val_frac=0.25, test_frac=0.25,
                      device="cpu", progress=False, dry_run=True))
    return cache, d / "run" / "best.pt"


def _decoded_features(monkeypatch):
    """Capture what the evaluation paths hand the decoder."""
    from stage2_decoder import evaluate as ev

    seen = []
    real = ev._decode_all

    def spy(cap, keys, feats, decode_cfg, **kw):
        seen.append((list(keys), feats.clone()))
        return real(cap, keys, feats, decode_cfg, **kw)

    monkeypatch.setattr(ev, "_decode_all", spy)
    return seen


def test_cache_and_raw_photos_decode_the_same_views(views_run, monkeypatch):
    from stage2_decoder.caption import Captioner
    from stage2_decoder.checkpoint import load_checkpoint
    from stage2_decoder.evaluate import captions_from_cache, captions_from_images

    cache, ckpt_path = views_run
    cap, ckpt = Captioner.from_checkpoint(ckpt_path, "cpu"), load_checkpoint(ckpt_path)
    seen = _decoded_features(monkeypatch)
    cfg = DecodeConfig(beam_size=2, views=3)
    res, recs = captions_from_cache(cap, ckpt, str(cache), "test", decode_cfg=cfg)
    raw, raw_recs, errors = captions_from_images(cap, recs, workers=0, progress=False, decode_cfg=cfg)
    assert not errors and [r.key for r in raw_recs] == [r.key for r in recs] and set(raw) == set(res)
    (keys_c, from_cache), (keys_r, from_raw) = seen
    assert keys_c == keys_r and from_cache.shape == from_raw.shape == (len(recs), 3, cap.backbone.feature_dim)
    torch.testing.assert_close(from_cache, from_raw, rtol=2e-3, atol=2e-3)  # float16 cache
    assert not torch.allclose(from_raw[:, 0], from_raw[:, 1])  # centre and mirrored really differ
    # the one-photo path (caption CLI) builds the same views
    one = cap.features([recs[0].path], views=3)
    torch.testing.assert_close(one[0], from_raw[0], rtol=1e-4, atol=1e-4)


def test_a_cache_with_fewer_views_decodes_what_it_has_with_a_note(shared_cache, views_run, capsys, monkeypatch):
    from stage2_decoder.caption import Captioner
    from stage2_decoder.checkpoint import load_checkpoint
    from stage2_decoder.evaluate import captions_from_cache

    _, ckpt_path = views_run
    cap, ckpt = Captioner.from_checkpoint(ckpt_path, "cpu"), load_checkpoint(ckpt_path)
    seen = _decoded_features(monkeypatch)
    one_view, _ = captions_from_cache(cap, ckpt, str(shared_cache), "test", decode_cfg=DecodeConfig(views=1))
    asked_two, _ = captions_from_cache(cap, ckpt, str(shared_cache), "test", decode_cfg=DecodeConfig(views=2))
    assert asked_two == one_view and seen[1][1].dim() == 2
    err = capsys.readouterr().err
    assert "holds 1 view" in err and "--views 2" in err


def test_caption_and_evaluate_take_views(cli, views_run, coco_records):
    cache, ckpt = views_run
    photo = coco_records[0].path
    proc = cli("stage2_decoder.caption", "--checkpoint", ckpt, "--views", "4", "--json", photo)
    assert proc.returncode == 0, proc.stderr
    assert '"caption"' in proc.stdout and photo in proc.stdout
    proc = cli("stage2_decoder.evaluate", "--checkpoint", ckpt, "--features", cache, "--split", "val",
               "--views", "2")
    assert proc.returncode == 0, proc.stderr
    assert "CIDEr" in proc.stdout
    bad = cli("stage2_decoder.caption", "--checkpoint", ckpt, "--views", "5", photo)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--views" in bad.stderr

