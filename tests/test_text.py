"""Tokenizer, vocabulary and caption padding: unit and property tests (no data, no network)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.tokenizer import tokenize
from common.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, VocabError, build_vocab
from stage2_decoder.training.pairs import pad_captions

PROPS = settings(max_examples=200, deadline=None)


def _has_alnum(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


# --- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog RUNS across the Grass.") == ["a", "dog", "runs", "across", "the", "grass"]
    assert tokenize("Two men , one woman -- and a cat !") == ["two", "men", "one", "woman", "and", "a", "cat"]
    assert tokenize('He said "hello" (twice)...') == ["he", "said", "hello", "twice"]


def test_tokenize_keeps_numbers_and_contractions():
    assert tokenize("3 dogs' toys, 2.5 ft") == ["3", "dogs", "toys", "2.5", "ft"]
    toks = tokenize("It's a dog's life")
    assert toks[0] == "it" and "'s" in toks and "life" == toks[-1]


def test_tokenize_empty_and_punctuation_only():
    assert tokenize("") == []
    assert tokenize("   ") == []
    assert tokenize(". , ! ? -- ...") == []


def test_tokenize_needs_no_nltk_data(monkeypatch):
    """No punkt or other downloaded resource may be looked up (the machines have no internet)."""
    import nltk.data

    def refuse(*args, **kwargs):
        raise LookupError(f"test: nltk resource lookup attempted: {args!r}")

    monkeypatch.setattr(nltk.data, "find", refuse)
    monkeypatch.setattr(nltk.data, "load", refuse)
    assert tokenize("A man rides a horse, then stops.") == ["a", "man", "rides", "a", "horse", "then", "stops"]


# caption-like text: words (maybe with punctuation or a clitic glued on), stand-alone punctuation,
# mixed whitespace, an optional sentence end
_word = st.builds(lambda w, g: w + g, st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True),
                  st.sampled_from(["", "", "", ",", ";", ":", "!", "?", "'s", "n't"]))
_punct = st.sampled_from([".", ",", "--", "!", "?", "...", "(", ")", '"', "'", ";", ":", "-"])
_caption = st.builds(lambda items, seps, end: "".join(i + s for i, s in zip(items, seps)) + end,
                     st.lists(st.one_of(_word, _word, _punct), max_size=12),
                     st.lists(st.sampled_from([" ", "  ", "\t", "\n"]), min_size=12, max_size=12),
                     st.sampled_from(["", ".", " .", "!", "?"]))


@PROPS
@given(_caption)
def test_tokenize_properties_on_caption_like_text(text):
    toks = tokenize(text)
    assert all(t for t in toks), toks
    assert all(_has_alnum(t) for t in toks), toks
    assert all(t == t.lower() for t in toks), toks
    assert tokenize(" ".join(toks)) == toks  # idempotent


@PROPS
@given(st.text(max_size=60))
def test_tokenize_never_returns_empty_or_punctuation_only_tokens(text):
    toks = tokenize(text)
    assert all(t and _has_alnum(t) for t in toks), toks


@pytest.mark.parametrize("text", ["a man. !", "::A dog"])
def test_tokenize_idempotent_with_glued_punctuation(text):
    toks = tokenize(text)
    assert tokenize(" ".join(toks)) == toks


# --- vocabulary --------------------------------------------------------------------------------------------

CAPS = [["a", "dog", "runs"], ["a", "cat", "sleeps"], ["a", "dog", "sleeps"], ["the", "dog", "barks"]]


def test_specials_first_and_pad_is_zero():
    v = build_vocab(CAPS, threshold=1)
    assert v.itos[:4] == [PAD, START, END, UNK] == list(SPECIALS)
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]


def test_threshold_is_honoured():
    v = build_vocab(CAPS, threshold=2)
    # a: 3, dog: 3, sleeps: 2 -> kept; runs, cat, the, barks: 1 -> <unk>
    assert v.itos[4:] == ["a", "dog", "sleeps"]
    assert v.threshold == 2
    assert v.encode(["dog", "cat"], add_specials=False) == [v.stoi["dog"], v.unk_id]
    v3 = build_vocab(CAPS, threshold=3)
    assert "sleeps" not in v3.stoi  # seen threshold-1 times
    assert v3.encode(["sleeps"], add_specials=False) == [v3.unk_id]


def test_most_frequent_first_ties_alphabetical():
    v = build_vocab([["b", "a", "c"], ["c", "b"], ["c"]], threshold=1)
    assert v.itos[4:] == ["c", "b", "a"]
    v = build_vocab([["zebra", "apple"]], threshold=1)
    assert v.itos[4:] == ["apple", "zebra"]


def test_specials_in_captions_are_not_duplicated():
    v = build_vocab([["<unk>", "<end>", "dog"]] * 3, threshold=1)
    assert v.itos == [*SPECIALS, "dog"]


def test_encode_decode_round_trip():
    v = build_vocab(CAPS, threshold=1)
    ids = v.encode(["a", "dog", "barks"])
    assert ids[0] == v.start_id and ids[-1] == v.end_id and len(ids) == 5
    assert v.decode(ids) == ["a", "dog", "barks"]
    # decode skips <start>/<pad> and stops at <end>
    assert v.decode([1, v.stoi["cat"], 0, v.stoi["dog"], 2, v.stoi["a"]]) == ["cat", "dog"]
    assert v.decode(torch.tensor([v.stoi["a"], 2])) == ["a"]


def test_json_round_trip(tmp_path):
    v = build_vocab(CAPS, threshold=2)
    p = tmp_path / "vocab.json"
    v.save(p)
    raw = json.loads(p.read_text())
    assert raw["words"] == v.itos and raw["threshold"] == 2
    w = Vocabulary.load(p)
    assert w == v and w.itos == v.itos and w.stoi == v.stoi and w.threshold == 2
    assert not (tmp_path / "vocab.json.tmp").exists()
    assert Vocabulary.from_dict(v.to_dict()) == v


@pytest.mark.parametrize("content", [
    "{not json",
    "[1, 2, 3]",
    json.dumps({"format": "capcache-vocab/1", "words": ["a", "b"]}),  # no specials
    json.dumps({"format": "capcache-vocab/1", "words": [*SPECIALS, "a", "a"]}),  # duplicate
    json.dumps({"format": "other/9", "words": list(SPECIALS)}),  # wrong format tag
    json.dumps({"format": "capcache-vocab/1", "words": "<pad> <start> <end> <unk>"}),  # not a list
    json.dumps({"format": "capcache-vocab/1"}),
])
def test_malformed_vocab_json_raises(tmp_path, content):
    p = tmp_path / "vocab.json"
    p.write_text(content)
    with pytest.raises(VocabError) as ei:
        Vocabulary.load(p)
    assert str(p) in str(ei.value)


def test_missing_vocab_file_raises(tmp_path):
    with pytest.raises(VocabError):
        Vocabulary.load(tmp_path / "absent.json")


@pytest.mark.parametrize("extra", [["x"], 5])
def test_vocab_with_non_string_words_raises_vocab_error(tmp_path, extra):
    p = tmp_path / "vocab.json"
    p.write_text(json.dumps({"format": "capcache-vocab/1", "words": [*SPECIALS, extra]}))
    with pytest.raises(VocabError):
        Vocabulary.load(p)


def test_build_vocab_independent_of_input_order():
    caps = [["a", "dog"], ["a", "cat"], ["the", "dog"], ["a", "bird", "flies"], ["the", "cat", "sleeps"]] * 3
    ref = build_vocab(caps, threshold=2)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = [list(c) for c in caps]
        rng.shuffle(shuffled)
        for c in shuffled:
            rng.shuffle(c)
        assert build_vocab(shuffled, threshold=2).itos == ref.itos


_words = st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=30, unique=True)


@PROPS
@given(_words, st.data())
def test_encode_decode_round_trips_any_in_vocab_words(words, data):
    v = build_vocab([words], threshold=1)
    sentence = data.draw(st.lists(st.sampled_from(words), max_size=25))
    ids = v.encode(sentence)
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.unk_id not in ids
    assert v.decode(ids) == sentence
    assert v.decode(v.encode(sentence, add_specials=False)) == sentence


# --- padding -----------------------------------------------------------------------------------------------

@PROPS
@given(st.lists(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=15), min_size=1, max_size=8),
       st.sampled_from([0, 7]))
def test_pad_captions_properties(seqs, pad_id):
    if pad_id:
        seqs = [[x for x in s if x != pad_id] or [1] for s in seqs]
    padded, lengths = pad_captions(seqs, pad_id)
    assert padded.dtype == torch.long and lengths.dtype == torch.long
    assert padded.shape == (len(seqs), max(len(s) for s in seqs))
    assert lengths.tolist() == [len(s) for s in seqs]
    for i, s in enumerate(seqs):
        assert padded[i, : len(s)].tolist() == s
        assert (padded[i, len(s):] == pad_id).all()


def test_error_and_warning_lines_escape_terminal_controls(capsys):
    """A library message may quote user text (a caption, a name inside an archive): an ESC sequence or a
    bidi override in it must reach the terminal as an escape, not act on it, and the line stays one line."""
    import warnings

    from common.cli import run_guarded

    def work():
        warnings.warn("caption 'a\u202eexe.jpg' skipped")
        raise ValueError("bad name 'x\x1b[2Jy'\nsecond line")

    assert run_guarded(work) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err
    assert err.splitlines() == ["warning: caption 'a\\u202eexe.jpg' skipped",
                                "error: bad name 'x\\x1b[2Jy' second line"]
