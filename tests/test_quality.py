"""Caption quality machinery: metric wrappers, the no-Java fallback, beam-search properties,
best-checkpoint selection and early stopping, and `evaluate` end to end on real images."""
from __future__ import annotations

import json

import pytest
import torch

from stage2_decoder.decoding.beam import END_ID, beam_search_nbest, greedy
from stage2_decoder.decoding.config import DecodeConfig
from stage2_decoder.model import CaptionDecoder, DecoderConfig
from stage2_decoder.reporting import metrics
from stage2_decoder.training.checkpoint import load_checkpoint

REFS = {"a": ["a man riding a wave on top of a surfboard", "a surfer riding a large wave in the ocean"],
        "b": ["two dogs playing with a red ball in the grass", "a pair of dogs chase a ball on a lawn"]}


# --- metric wrappers on hand-made cases ---------------------------------------------------------------------

def test_ptb_tokenizing_keeps_each_caption_on_its_image_whatever_its_line_breaks():
    if not metrics.java_available():
        pytest.skip("Java is not installed")
    # the Java tokenizer ends a line at each of these: every later caption moved onto the image before it
    caps = {"1": ["a dog\rruns on grass", "a dog runs"], "2": ["a cat\u2028sleeps", "x\x0by\x0cz\x85w\u2029v"],
            "3": ["a red bus."], "4": ["un cafe\u0301"]}
    assert metrics.ptb_tokenize(caps) == {"1": ["a dog runs on grass", "a dog runs"],
                                          "2": ["a cat sleeps", "x y z w v"], "3": ["a red bus"],
                                          "4": ["un caf\u00e9"]}  # composed, as the decoder's words are


@pytest.mark.parametrize("java", [True, False], ids=["java", "no-java"])
def test_identical_captions_score_perfect_bleu(monkeypatch, java):
    if java and not metrics.java_available():
        pytest.skip("Java is not installed")
    monkeypatch.setattr(metrics, "java_available", lambda: java)
    res = {k: refs[0] for k, refs in REFS.items()}
    scores, per_image, notes = metrics.score_captions(REFS, res)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] > 0.5 and set(per_image) == set(REFS)
    assert ("METEOR" in scores) == java
    if java:
        assert scores["METEOR"] > 0.9 and notes == []


def test_disjoint_captions_score_zero():
    res = {"a": "purple elephants juggle violins", "b": "quantum soup evaporates slowly"}
    scores, per_image, _ = metrics.score_captions(REFS, res)
    assert scores["BLEU-1"] < 1e-6 and scores["BLEU-4"] < 1e-6
    assert scores["CIDEr"] == pytest.approx(0.0, abs=1e-9) and all(v == 0 for v in per_image.values())
    assert scores["ROUGE-L"] == pytest.approx(0.0, abs=1e-9)


def test_without_java_the_java_parts_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    res = {"a": "a man riding a wave", "b": "two dogs in the grass"}
    scores, _, notes = metrics.score_captions(REFS, res)
    assert "METEOR" not in scores and "SPICE" not in scores
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores) and scores["CIDEr"] > 0
    assert len(notes) == 1 and "Java" in notes[0]


def test_fast_cider_ranks_like_the_reference_scorer():
    good = {"a": "a man riding a wave on a surfboard", "b": "two dogs playing with a ball in the grass"}
    bad = {"a": "a plate of food on a table", "b": "a red bus on the street"}
    assert metrics.cider(REFS, good)[0] > metrics.cider(REFS, bad)[0] + 0.5
    # an empty caption is scored (as nothing), not rejected
    assert metrics.cider(REFS, {"a": "", "b": good["b"]})[1]["a"] == 0.0


def test_caption_stats():
    stats = metrics.caption_stats({"1": "a dog", "2": "a dog", "3": "a cat on a mat", "4": "a dog"})
    assert stats == {"vocab_used": 5, "distinct_fraction": 0.5, "most_common_caption": "a dog",
                     "most_common_fraction": 0.75}


# --- beam search properties ---------------------------------------------------------------------------------

V, D = 12, 16


def _model(seed: int) -> CaptionDecoder:
    torch.manual_seed(seed)
    m = CaptionDecoder(DecoderConfig(D, V, embed_size=8, hidden_size=16))
    with torch.no_grad():
        m.out.weight.mul_(6.0)  # peaky, image-dependent distributions
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@torch.no_grad()
def _logprob(model: CaptionDecoder, feat: torch.Tensor, ids: list[int], ended: bool) -> float:
    state = model.init_state(feat[None])
    tok, total = torch.tensor([1]), 0.0
    for w in ids + ([END_ID] if ended else []):
        logp, state = model.step(tok, state)
        total += float(logp[0, w])
        tok = torch.tensor([w])
    return total


@pytest.mark.parametrize("seed", range(4))
def test_nbest_scores_are_sorted_and_equal_the_model_log_probability(seed):
    model, feats = _model(seed), torch.randn(3, D)
    cfg = DecodeConfig(beam_size=4, max_len=8, min_len=0, length_penalty=0.7)
    for i, hyps in enumerate(beam_search_nbest(model, feats, cfg)):
        scores = [s for _, s in hyps]
        assert scores == sorted(scores, reverse=True) and len(hyps) >= 1
        for ids, score in hyps:
            ended = len(ids) < cfg.max_len
            norm = (len(ids) + 1 if ended else cfg.max_len) ** cfg.length_penalty
            assert score == pytest.approx(_logprob(model, feats[i], ids, ended) / norm, abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_is_greedy_and_min_len_holds(seed):
    model, feats = _model(seed), torch.randn(5, D)
    one = [h[0][0] for h in beam_search_nbest(model, feats, DecodeConfig(1, 10, 0, 0.0))]
    assert one == greedy(model, feats, 10)
    for hyps in beam_search_nbest(model, feats, DecodeConfig(3, 10, min_len=4)):
        assert all(len(ids) >= 4 for ids, _ in hyps)


def test_ngram_blocking_holds_even_when_the_model_wants_to_repeat():
    model = _model(0)
    with torch.no_grad():  # a model that loves words 5 and 6 and never wants to stop
        model.out.weight.zero_()
        model.out.bias.fill_(-5.0)
        model.out.bias[5], model.out.bias[6], model.out.bias[END_ID] = 3.0, 2.9, -20.0
    feats = torch.randn(2, D)
    plain = beam_search_nbest(model, feats, DecodeConfig(3, 12, no_repeat_ngram=0))[0][0][0]
    assert len(plain) - len({tuple(plain[i:i + 2]) for i in range(len(plain) - 1)}) > 1  # repeats unblocked
    for n in (1, 2, 3):
        for hyps in beam_search_nbest(model, feats, DecodeConfig(3, 12, no_repeat_ngram=n)):
            for ids, _ in hyps:
                grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
                assert len(grams) == len(set(grams)), (n, ids)


# --- best checkpoint by validation CIDEr, early stopping --------------------------------------------------

def test_best_checkpoint_and_early_stopping_follow_the_validation_metric(shared_cache, tmp_path, monkeypatch):
    from stage2_decoder import train as train_mod
    from stage2_decoder.training import epochs as epochs_mod

    sequence = iter([0.10, 0.30, 0.20, 0.25, 0.29, 0.90, 0.95])
    monkeypatch.setattr(epochs_mod, "validation_cider", lambda *a, **k: next(sequence))
    cfg = train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=7, patience=3,
                                scst_epochs=0, lr_patience=1, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True,
                                device="cpu", progress=False)
    result = train_mod.train(cfg)
    # epochs 3, 4, 5 do not beat epoch 2's 0.30: stop after epoch 5, never see the 0.90
    assert [h["val_cider"] for h in result.history] == [0.1, 0.3, 0.2, 0.25, 0.29]
    assert result.epochs_run == 5 and result.best_epoch == 2 and result.best_val_cider == 0.30
    best, last = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "run" / "last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 5 and best["best"]["val_cider"] == 0.30
    lrs = [h["lr"] for h in result.history]  # plateau schedule halved the lr after a flat epoch
    assert lrs[0] == cfg.lr and lrs[-1] < cfg.lr


def test_validation_cider_scores_the_decoder_it_is_asked_for():
    from common.vocab import SPECIALS, Vocabulary
    from stage2_decoder.decoding.beam import decode
    from stage2_decoder.training.epochs import validation_cider

    model, feats = _model(1), torch.randn(16, D)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(V - len(SPECIALS)))])
    assert len(vocab) == V
    rows = {f"k{i}": i for i in range(16)}

    def captions(cfg):
        return {k: " ".join(vocab.decode(ids)) for k, ids in zip(rows, decode(model, feats, cfg))}
    by_greedy, by_beam = captions(DecodeConfig(beam_size=1, min_len=0)), captions(DecodeConfig(beam_size=3))
    refs = {k: [by_beam[k], "w3 w4 w5"] for k in rows}  # the beam's own captions score best
    assert metrics.cider(refs, by_beam)[0] > metrics.cider(refs, by_greedy)[0] + 0.5  # the test tells them apart
    assert validation_cider(model, vocab, feats, rows, refs) == pytest.approx(metrics.cider(refs, by_greedy)[0])
    assert validation_cider(model, vocab, feats, rows, refs, beam_size=3) == \
        pytest.approx(metrics.cider(refs, by_beam)[0])


def test_validation_shows_its_progress_unless_asked_not_to(capsys):
    # a minute an epoch on full COCO on a CPU, with nothing on the screen between the epoch's bar and its line
    import math

    from common.records import ImageRecord
    from common.vocab import SPECIALS, Vocabulary
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.epochs import validate
    from stage2_decoder.training.pairs import CaptionPairs

    model, feats = _model(1), torch.randn(16, D)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(V - len(SPECIALS)))])
    rows = {f"k{i}": i for i in range(16)}
    refs = {k: ["w3 w4 w5"] for k in rows}
    pairs = CaptionPairs([ImageRecord(k, i, f"/{k}.jpg", refs[k]) for k, i in rows.items()], rows, vocab)
    for progress in (True, False):
        cfg = TrainConfig(features="f.h5", out="run", batch_size=4, progress=progress)
        got = validate(model, cfg, pairs, feats, rows, vocab, refs, torch.device("cpu"))
        err = capsys.readouterr().err
        assert math.isfinite(got["val_loss"]) and got["val_cider"] >= 0
        assert ("val loss" in err and "val decode" in err) == progress and (err == "") != progress


def test_training_validates_with_the_configured_beam(shared_cache, tmp_path, monkeypatch):
    from stage2_decoder import train as train_mod
    from stage2_decoder.training import epochs as epochs_mod

    seen = []
    monkeypatch.setattr(epochs_mod, "validation_cider", lambda *a, **k: seen.append(k.get("beam_size")) or 0.1)
    cfg = train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=2, scst_epochs=1,
                                val_beam_size=3, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True,
                                device="cpu", progress=False)
    train_mod.train(cfg)
    assert seen == [3, 3, 3]  # both phases select by the same decoder
    with pytest.raises(ValueError, match="val-beam-size"):
        train_mod.train(train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "r2"), val_beam_size=0))


def test_select_by_loss_ignores_cider(shared_cache, tmp_path, monkeypatch):
    from stage2_decoder import train as train_mod
    from stage2_decoder.training import epochs as epochs_mod

    monkeypatch.setattr(epochs_mod, "validation_cider", lambda *a, **k: 0.0)
    cfg = train_mod.TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=3, select_by="loss",
                                scst_epochs=0, embed_size=16, hidden_size=32, vocab_threshold=2, batch_size=64, device="cpu",
                                progress=False)
    result = train_mod.train(cfg)
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))


def test_the_ptb_tokenizer_writes_nothing_into_the_installed_package(monkeypatch):
    """pycocoevalcap's PTBTokenizer writes its input file into its package folder: a user who cannot
    write there (a shared or system install, a container run as another user) got 'Permission denied'
    from every evaluation. Ours tokenizes the same, with its file in the temp folder."""
    import tempfile
    from pathlib import Path

    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from stage2_decoder.reporting import metrics

    if not metrics.java_available():
        pytest.skip("Java is not installed")
    caps = {"1": ["A dog, running on the grass!", "it's (really) a dog..."], "2": ["", "Two cats -- asleep; "]}
    want = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    package = Path(ptbtokenizer.__file__).resolve().parents[1]  # a namespace package: no __file__ of its own

    def outside_the_package(real):
        def make(*a, **kw):
            if kw.get("dir") and Path(kw["dir"]).resolve().is_relative_to(package):
                raise PermissionError(13, "Permission denied", kw["dir"])
            return real(*a, **kw)
        return make

    for name in ("mkstemp", "NamedTemporaryFile"):  # what a read-only package folder refuses
        monkeypatch.setattr(tempfile, name, outside_the_package(getattr(tempfile, name)))
    scores, _, notes = metrics.score_captions({"1": caps["1"], "2": caps["2"][1:]}, {"1": "a dog", "2": "two cats"})
    assert scores["CIDEr"] > 0 and "METEOR" in scores and not notes
    assert metrics.ptb_tokenize(caps) == want


# --- evaluate end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(shared_cache, tmp_path_factory):
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path_factory.mktemp("quality") / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=2, batch_size=32, embed_size=32,
                      hidden_size=64, vocab_threshold=2, val_frac=0.1, test_frac=0.2, device="cpu",
                      progress=False))
    return run


def test_evaluate_cache_split(cli, small_run, shared_cache, tmp_path):
    out = tmp_path / "eval.json"
    proc = cli("stage2_decoder.evaluate", "--checkpoint", small_run / "best.pt", "--features", shared_cache,
               "--split", "test", "--beam-size", "2", "--json-out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    test_keys = load_checkpoint(small_run / "best.pt")["split"]["test"]
    assert sorted(i["key"] for i in report["images"]) == sorted(test_keys) and report["n_images"] == len(test_keys)
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert name in report["metrics"] and 0.0 <= report["metrics"][name] <= 10.0
    assert report["decode"]["beam_size"] == 2
    assert 0 < report["stats"]["distinct_fraction"] <= 1 and report["stats"]["vocab_used"] > 0
    for word in ("BLEU-4", "CIDEr", "distinct"):
        assert word in proc.stdout


def _evaluate_raw(cli, small_run, coco_dir, out, *args):
    """evaluate on the COCO photos themselves -> (process, its JSON report)."""
    proc = cli("stage2_decoder.evaluate", "--checkpoint", small_run / "best.pt", "--dataset", "coco",
               "--images", coco_dir / "images", "--captions", coco_dir / "captions.json", *args,
               "--workers", "0", "--json-out", out)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_evaluate_raw_images_matches_the_cache_path(cli, small_run, coco_dir, tmp_path):
    proc, report = _evaluate_raw(cli, small_run, coco_dir, tmp_path / "raw.json", "--limit", "6")
    assert report["source"] == "images" and report["metrics"]["CIDEr"] >= 0
    assert len(report["images"]) == 6
    for item in report["images"]:
        assert item["caption"].strip() and len(item["references"]) >= 5 and item["cider"] >= 0
    # these are the checkpoint's own dataset: the images outside its val and test splits were trained on,
    # and the report and stderr say how many
    split = load_checkpoint(small_run / "best.pt")["split"]
    trained_on = sum(i["key"] not in split["val"] + split["test"] for i in report["images"])
    assert trained_on > 0
    said = [n for n in report["notes"] if "not held out" in n]
    assert len(said) == 1 and said[0].startswith(f"{trained_on} of 6 images")
    assert f"warning: {trained_on} of 6 images" in proc.stderr


def test_evaluate_raw_images_of_the_test_split_alone(cli, small_run, coco_dir, flickr_dir, tmp_path):
    proc, report = _evaluate_raw(cli, small_run, coco_dir, tmp_path / "raw-test.json", "--split", "test")
    test_keys = load_checkpoint(small_run / "best.pt")["split"]["test"]
    assert sorted(i["key"] for i in report["images"]) == sorted(test_keys)
    assert report["source"] == "images:test" and not report["notes"] and "warning" not in proc.stderr
    # a captions file with none of the split's images: said in one line, nothing decoded
    proc = cli("stage2_decoder.evaluate", "--checkpoint", small_run / "best.pt", "--dataset", "flickr8k",
               "--images", flickr_dir / "Images", "--captions", flickr_dir / "captions.txt", "--split", "test")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "none of the" in proc.stderr and "test split" in proc.stderr


def test_evaluate_needs_exactly_one_input_mode(cli, small_run, shared_cache, coco_dir):
    proc = cli("stage2_decoder.evaluate", "--checkpoint", small_run / "best.pt", "--features", shared_cache,
               "--images", coco_dir / "images", "--captions", coco_dir / "captions.json")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "either --features" in proc.stderr


# --- self-critical training ---------------------------------------------------------------------------------

def test_cider_d_with_corpus_frequencies_equals_the_reference_scorer(coco_records):
    from pycocoevalcap.cider.cider import Cider

    from common.tokenizer import tokenize
    from stage2_decoder.training.cider import CiderD

    recs = coco_records[:40]
    refs = {r.key: r.captions[1:] for r in recs}
    hyps = {r.key: (r.captions[0] if i % 3 else recs[(i + 7) % 40].captions[0]) for i, r in enumerate(recs)}
    mine = CiderD(refs)
    keys = sorted(hyps)
    _, theirs = Cider().compute_score({k: [" ".join(tokenize(c)) for c in refs[k]] for k in keys},
                                      {k: [" ".join(tokenize(hyps[k]))] for k in keys})
    for k, want in zip(keys, theirs):
        assert mine.score(k, tokenize(hyps[k])) == pytest.approx(float(want), abs=1e-9)


def test_sampled_captions_are_masked_after_end():
    from stage2_decoder.training.scst import sample

    model = _model(1)
    torch.manual_seed(0)
    ids, logp, mask = sample(model, torch.randn(3, D), k=4, max_len=9)
    assert ids.shape == logp.shape == mask.shape and ids.shape[0] == 12 and logp.requires_grad
    for row, m in zip(ids.tolist(), mask.tolist()):
        if END_ID in row:
            e = row.index(END_ID)
            assert all(w == 0 for w in row[e + 1:]) and m[:e + 1] == [1.0] * (e + 1) and not any(m[e + 1:])
        else:
            assert all(m) and 0 not in row


def test_scst_phase_follows_cross_entropy_from_the_best_epoch(shared_cache, tmp_path):
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    cfg = TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=2, scst_epochs=2, batch_size=16,
                      embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu", progress=False)
    result = train(cfg)
    phases = [h.get("phase", "xe") for h in result.history]
    assert phases == ["xe", "xe", "scst", "scst"]
    assert all("train_reward" in h and "train_loss" not in h for h in result.history[2:])
    assert [h["lr"] for h in result.history[2:]] == [cfg.scst_lr, cfg.scst_lr]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 4


def test_training_captions_are_tokenised_once_for_vocab_tensors_and_rewards(shared_cache, tmp_path, monkeypatch):
    import common.tokenizer as tokenizer_mod
    import stage2_decoder.training.cider as cider_mod
    import stage2_decoder.training.data as training_data_mod
    import stage2_decoder.training.pairs as data_mod
    import stage2_decoder.training.scst as scst_mod
    from common.feature_cache import load_cache
    from stage2_decoder.training.cider import CiderD
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.pairs import CaptionPairs
    from stage2_decoder.training.scst import scst_refs

    cfg = TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), vocab_threshold=2)
    monkeypatch.setenv("CAPCACHE_TOKEN_CACHE", str(tmp_path / "tokens"))  # an empty token cache
    calls = []
    real = tokenizer_mod.tokenize
    monkeypatch.setattr(tokenizer_mod, "tokenize", lambda c, *how: calls.append(c) or real(c, *how))
    parts, _, vocab, rows, tokens = training_data_mod.prepare_data(cfg, load_cache(shared_cache))
    assert len(calls) == sum(len(r.captions) for name in ("train", "val") for r in parts[name])

    # the tokenised pass gives exactly what tokenising at each use gives
    plain_pairs = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len)
    plain_cider = CiderD(scst_refs(parts["train"]))

    def refuse(c, *how):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data_mod, "tokenize", refuse)
    monkeypatch.setattr(scst_mod, "tokenize", refuse)
    monkeypatch.setattr(cider_mod, "tokenize", refuse)
    pairs = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens)
    cider_d = CiderD(scst_refs(parts["train"], tokens))
    assert torch.equal(pairs.tokens, plain_pairs.tokens) and torch.equal(pairs.rows, plain_pairs.rows)
    keys = [r.key for r in parts["train"] if tokens[r.key]]
    hyps = [tokens[k][0] for k in keys]
    assert cider_d.keys == plain_cider.keys
    assert cider_d.score_batch(keys, hyps).tolist() == plain_cider.score_batch(keys, hyps).tolist()
