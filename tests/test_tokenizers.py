"""Named tokenizers (nltk, whitespace, chars): what each splits, that the choice is recorded in the
vocabulary and checkpoint and used again for decoding and scoring, and a Japanese run end to end."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from common.tokenizer import TOKENIZERS, join_tokens, tokenize
from common.vocab import SPECIALS, Vocabulary, VocabError, build_vocab

# two Japanese captions each for 20 shared COCO photos (by COCO id), written for this test
JAPANESE = {
    "139": ["テーブルのそばに女性が立っている。", "椅子とテーブルのある部屋に女性がいる。"],
    "285": ["草むらの前に大きな熊がいる。", "大きな茶色の熊が草の上にいる。"],
    "632": ["本棚と青い布団のある寝室。", "本でいっぱいの本棚がある寝室。"],
    "724": ["止まれの標識が逆さまに付いている。", "逆さまの止まれの標識。"],
    "785": ["スキーを履いた女性が写真に写っている。", "女性がスキー板の上に立っている。"],
    "790": ["家族がテーブルでケーキを食べている。", "テーブルの周りの人たちがケーキを待っている。"],
    "872": ["野球選手が二人グラウンドに立っている。", "晴れた日に二人の男性が野球をしている。"],
    "885": ["白い服の選手がテニスをしている。", "テニス選手がボールを打っている。"],
    "1000": ["人々が集合写真を撮っている。", "大家族がテニスコートで写真を撮っている。"],
    "1353": ["子供たちがオレンジ色の小さな電車に乗っている。", "子供たちがおもちゃの電車に乗っている。"],
    "1425": ["テーブルの上の皿に食事がある。", "テーブルの上にサンドイッチがある。"],
    "1503": ["机の上にパソコンとノートパソコンがある。", "机の上のコンピューター。"],
    "1584": ["赤い二階建てのバスが走っている。", "赤い二階建てバスが町の道を走っている。"],
    "1675": ["猫がノートパソコンの上で休んでいる。", "黒い猫がキーボードの上に座っている。"],
    "1993": ["ベッドと小さなテーブルのある寝室。", "ベッドと窓のある部屋。"],
    "2006": ["紫色のバスが駐車している。", "町の道に紫色のバスがいる。"],
    "2153": ["打者がバットを振ろうとしている。", "野球選手がバットを振っている。"],
    "3661": ["木のテーブルの上にバナナがある。", "テーブルの上のバナナの房。"],
    "4765": ["男性が海で波に乗っている。", "サーフボードで大きな波に乗る男性。"],
    "4795": ["猫がパソコンの画面を見ている。", "猫が座って画面を見ている。"],
}


# --- the tokenizers ------------------------------------------------------------------------------------------

def test_nltk_stays_the_default_and_unchanged():
    assert tokenize("A Dog's toy, on the grass.") == tokenize("A Dog's toy, on the grass.", "nltk") == \
        ["a", "dog", "'s", "toy", "on", "the", "grass"]


def test_nltk_strips_any_scripts_punctuation_glued_to_a_word():
    # it stripped ASCII marks and a few quotes only: "¿qué" and "qué" were two words of a Spanish vocabulary
    assert tokenize("¿Qué hace el perro? ¡Un perro!", "nltk") == ["qué", "hace", "el", "perro", "un", "perro"]
    assert tokenize("Ein Hund‚ der ‹läuft›†", "nltk") == ["ein", "hund", "der", "läuft"]
    assert tokenize("猫が寝ている。", "nltk") == ["猫が寝ている"]
    assert tokenize("It isn't the man's.", "nltk") == ["it", "is", "n't", "the", "man", "'s"]  # clitics kept


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_word_typed_with_a_separate_accent_is_the_same_word(name):
    # "cafe" + U+0301 and "café" were two words of an nltk or whitespace vocabulary
    assert tokenize("Un cafe\u0301 noir", name) == tokenize("un café noir", name)
    assert "caf\u00e9" in "".join(tokenize("Un cafe\u0301", name))


def test_whitespace_splits_on_spaces_only_and_strips_any_scripts_punctuation():
    assert tokenize("Un chien, sur l'herbe !", "whitespace") == ["un", "chien", "sur", "l'herbe"]
    assert tokenize("「狗」 在 草地 上 跑 。", "whitespace") == ["狗", "在", "草地", "上", "跑"]


def test_chars_makes_every_letter_a_token_and_drops_spaces_and_punctuation():
    assert tokenize("猫が、ソファーで 寝ている！", "chars") == list("猫がソファーで寝ている")
    assert tokenize("A 犬。", "chars") == ["a", "犬"]
    # a combining vowel sign stays with its consonant (Thai "yu" = ย + ู + ่)
    assert tokenize("อยู่", "chars") == ["อ", "ยู่"]
    assert tokenize("。、！ 「」", "chars") == []


@pytest.mark.parametrize("name", TOKENIZERS)
def test_joining_then_splitting_gives_the_tokens_back(name):
    text = {"nltk": "two dogs play in the snow", "whitespace": "狗 在 草地 上 跑", "chars": "犬が雪の中で遊んでいる"}[name]
    toks = tokenize(text, name)
    assert toks and tokenize(join_tokens(toks, name), name) == toks
    assert (" " in join_tokens(toks, name)) == (name != "chars")


def test_an_unknown_tokenizer_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'mecab'; choose from nltk, whitespace, chars"):
        tokenize("猫", "mecab")


# --- recorded in the vocabulary -------------------------------------------------------------------------------

def test_the_vocabulary_records_its_tokenizer_and_joins_as_it_splits(tmp_path):
    v = build_vocab([tokenize(c, "chars") for caps in JAPANESE.values() for c in caps], 1, "chars")
    assert v.tokenizer == "chars" and all(len(w) == 1 for w in v.itos[len(SPECIALS):])
    v.save(tmp_path / "vocab.json")
    saved = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert saved["tokenizer"] == "chars"
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w == v and w.tokenizer == "chars"
    assert w.caption(w.encode(tokenize("猫が座っている", "chars"))) == "猫が座っている"
    assert build_vocab([["a", "dog"]], 1).caption([1, 4, 5, 2]) == "a dog"


def test_a_vocabulary_from_before_the_setting_reads_as_nltk_and_a_bad_name_is_refused():
    old = {"format": "capcache-vocab/1", "threshold": 1, "words": [*SPECIALS, "a", "dog"]}
    assert Vocabulary.from_dict(old).tokenizer == "nltk"
    assert Vocabulary.from_dict(old) != Vocabulary.from_dict({**old, "tokenizer": "chars"})
    with pytest.raises(VocabError, match="unknown tokenizer 'kanji'"):
        Vocabulary.from_dict({**old, "tokenizer": "kanji"})


# --- used again for scoring -----------------------------------------------------------------------------------

def test_cider_scores_chars_runs_by_character():
    from stage2_decoder.reporting.metrics import cider

    refs = {k: caps for k, caps in list(JAPANESE.items())[:6]}
    good = {k: caps[0].rstrip("。") for k, caps in refs.items()}
    bad = {k: refs[o][0] for k, o in zip(refs, [*list(refs)[1:], list(refs)[0]])}  # another photo's caption
    assert cider(refs, good, "chars")[0] > cider(refs, bad, "chars")[0] + 1.0
    # split as English words, a caption without spaces is one token: nothing but exact matches score
    near = {k: caps[0].replace("。", "だ。") for k, caps in refs.items()}
    assert cider(refs, near, "nltk")[0] == 0.0 < cider(refs, near, "chars")[0]


def test_score_captions_never_hands_chars_runs_to_the_english_ptb_tokenizer(monkeypatch):
    from stage2_decoder.reporting import metrics

    def refuse(*a, **k):
        raise AssertionError("PTB tokenizer used on a chars run")

    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "ptb_tokenize", refuse)
    refs = dict(list(JAPANESE.items())[:4])
    res = {k: caps[1] for k, caps in refs.items()}
    scores, per_image, notes = metrics.score_captions(refs, res, spice=True, tokenizer="chars")
    assert scores["CIDEr"] > 1.0 and scores["BLEU-4"] > 0.5 and "METEOR" not in scores and "SPICE" not in scores
    assert set(per_image) == set(refs) and any("tokenizer chars" in n for n in notes)
    stats = metrics.caption_stats(res, "chars")
    assert stats["vocab_used"] == len({ch for c in res.values() for ch in tokenize(c, "chars")})


def test_scst_references_follow_the_runs_tokenizer(coco_records):
    from stage2_decoder.training.cider import CiderD
    from stage2_decoder.training.scst import scst_refs

    # copies: the session's records are shared with other tests
    ja = [dataclasses.replace(r, captions=JAPANESE[r.key]) for r in coco_records if r.key in JAPANESE][:3]
    refs = scst_refs(ja, tokenizer="chars")
    assert refs[ja[0].key][0] == tokenize(JAPANESE[ja[0].key][0], "chars")
    scorer = CiderD(refs)
    assert scorer.score(ja[0].key, refs[ja[0].key][0]) > scorer.score(ja[0].key, refs[ja[1].key][0])
    from_text = CiderD({r.key: r.captions for r in ja}, "chars")  # raw captions split by the same tokenizer
    assert [from_text.score(k, refs[k][0]) for k in refs] == [scorer.score(k, refs[k][0]) for k in refs]


# --- a Japanese run through the real CLIs ----------------------------------------------------------------------

def test_a_japanese_run_trains_on_characters_and_captions_without_spaces(cli, coco_records, tmp_path):
    from common.feature_cache import load_cache
    from stage2_decoder.reporting.metrics import score_captions
    from stage2_decoder.training.checkpoint import load_checkpoint

    photos, rows = tmp_path / "photos", []
    photos.mkdir()
    for r in coco_records:
        if r.key in JAPANESE:
            name = f"{r.key}.jpg"
            shutil.copyfile(r.path, photos / name)
            rows += [{"image": name, "caption": c} for c in JAPANESE[r.key]]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cache, run = tmp_path / "cache.h5", tmp_path / "run"

    def ok(proc):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc

    ok(cli("stage1_extract", "--images", photos, "--captions", captions, "--out", cache, "--backbone",
           "mobilenet_v2", "--workers", 0, "--no-progress"))
    assert load_cache(cache).meta.dataset_format == "folder"
    ok(cli("stage2_decoder.train", "--features", cache, "--out", run, "--tokenizer", "chars", "--epochs", 2,
           "--hidden-size", 32, "--embed-size", 32, "--batch-size", 16, "--vocab-threshold", 1, "--val-images", 8,
           "--val-frac", 0.2, "--scst-epochs", 0, "--no-progress"))

    vocab = json.loads((run / "vocab.json").read_text(encoding="utf-8"))
    chars = set(vocab["words"][len(SPECIALS):])
    assert vocab["tokenizer"] == "chars" and {"が", "の", "い"} <= chars and all(len(w) == 1 for w in chars)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["vocab"]["tokenizer"] == "chars" and ckpt["train_config"]["tokenizer"] == "chars"
    history = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["val_cider"]) for h in history)

    proc = ok(cli("stage2_decoder.caption", "--checkpoint", run / "best.pt", photos, "--json"))
    items = json.loads(proc.stdout)
    assert len(items) == len(JAPANESE)
    for item in items:
        text = item["caption"]
        assert text and " " not in text, item
        assert set(text.replace("<unk>", "")) <= chars, item

    # a terminal whose encoding has no such characters (Latin-1): escaped, not a crash after the work is done
    latin = ok(cli("stage2_decoder.caption", "--checkpoint", run / "best.pt", photos, "--json",
                   env={"PYTHONIOENCODING": "latin-1"}))
    assert json.loads(latin.stdout) == items and "\\u" in latin.stdout
    text = ok(cli("stage2_decoder.caption", "--checkpoint", run / "best.pt", photos,
                  env={"PYTHONIOENCODING": "latin-1"}))
    assert len(text.stdout.splitlines()) == len(JAPANESE)

    res = {item["image"]: item["caption"] for item in items}
    gts = {str(photos / f"{k}.jpg"): caps for k, caps in JAPANESE.items()}
    scores, per_image, _ = score_captions(gts, res, tokenizer=ckpt["vocab"]["tokenizer"])
    assert math.isfinite(scores["CIDEr"]) and len(per_image) == len(JAPANESE)


def test_a_run_from_before_the_setting_resumes_as_nltk(shared_cache, tmp_path):
    """A last.pt whose config and vocabulary name no tokenizer was split by NLTK: it resumes with the
    default and is refused with another."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    def cfg(**more):
        return TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), embed_size=16, hidden_size=32,
                           batch_size=16, vocab_threshold=2, val_images=8, scst_epochs=0, dry_run=True,
                           device="cpu", progress=False, **more)

    train(cfg(epochs=1))
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["train_config"]["tokenizer"] == ckpt["vocab"]["tokenizer"] == "nltk"
    del ckpt["train_config"]["tokenizer"], ckpt["vocab"]["tokenizer"]
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match=r"other settings \(tokenizer 'nltk' -> 'whitespace'\)"):
        train(cfg(epochs=2, tokenizer="whitespace"))
    assert train(cfg(epochs=2)).epochs_run == 2
