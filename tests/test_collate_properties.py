"""Property tests (hypothesis) for the padded collate the training loop really uses:
`CaptionPairs.gather`, on top of `pad_captions` (whose own properties are in test_text.py).

For any captions (words in and out of the vocabulary, empty and punctuation-only ones, any
length up to and past max_len) and any batch of pair indices (repeats allowed):
inputs are `<start> w1 .. wn` and targets `w1 .. wn <end>`, both padded with <pad> to the
longest in the batch; lengths are n + 1; <end> is never an input and <start> never a target;
each pair's feature row travels with it; packing the targets keeps exactly one <end> per pair.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from common.records import ImageRecord
from common.tokenizer import tokenize
from common.vocab import build_vocab
from stage2_decoder.training.pairs import CaptionPairs

KNOWN = ["a", "dog", "cat", "runs", "on", "the", "grass", "café"]
OTHER = ["zebra", "kite", "ünïcode"]
_caption = st.lists(st.sampled_from(KNOWN + OTHER + [",", ".", "!", "--"]), max_size=14).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(captions=st.lists(st.lists(_caption, min_size=1, max_size=4), min_size=1, max_size=6),
       max_len=st.integers(min_value=1, max_value=10), data=st.data())
def test_gather_builds_aligned_padded_batches(captions, max_len, data):
    vocab = build_vocab([KNOWN], threshold=1)
    records = [ImageRecord(str(i), i, f"/x/{i}.jpg", caps) for i, caps in enumerate(captions)]
    rows = {r.key: 10 + i for i, r in enumerate(records)}  # feature rows need not equal record order
    expected = [(rows[r.key], tokenize(c)[:max_len]) for r in records for c in r.captions if tokenize(c)]
    if not expected:
        return  # CaptionPairs refuses a split without one usable caption (tested elsewhere)
    pairs = CaptionPairs(records, rows, vocab, max_len)
    assert len(pairs) == len(expected)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, len(pairs) - 1), min_size=1, max_size=8)))
    features = torch.arange(20, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row r holds r
    b = pairs.gather(idx, features)
    T = int(b.lengths.max())
    assert b.inputs.shape == b.targets.shape == (len(idx), T)
    for j, i in enumerate(idx[b.order].tolist()):  # gather puts the longest caption first
        row, words = expected[i]
        ids = vocab.encode(words, add_specials=False)
        n = len(ids)
        assert int(b.lengths[j]) == n + 1
        assert b.inputs[j, : n + 1].tolist() == [vocab.start_id, *ids]
        assert b.targets[j, : n + 1].tolist() == [*ids, vocab.end_id]
        assert (b.inputs[j, n + 1:] == vocab.pad_id).all() and (b.targets[j, n + 1:] == vocab.pad_id).all()
        assert vocab.decode(b.targets[j].tolist()) == [w if w in vocab.stoi else "<unk>" for w in words]
        assert b.features[j].tolist() == [float(row)] * 3
    assert not (b.inputs == vocab.end_id).any() and not (b.targets == vocab.start_id).any()
    packed = pack_padded_sequence(b.targets, b.lengths, batch_first=True, enforce_sorted=False).data
    assert packed.numel() == int(b.lengths.sum()) and int((packed == vocab.end_id).sum()) == len(idx)
    assert not (packed == vocab.pad_id).any()
