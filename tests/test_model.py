"""Decoder shapes, teacher-forcing alignment, decoding, eval-mode batch of one, checkpoints, overfitting."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.records import ImageRecord
from common.tokenizer import tokenize
from common.vocab import Vocabulary, build_vocab
from stage2_decoder.decoding.beam import beam_search_nbest, greedy
from stage2_decoder.decoding.config import DecodeConfig
from stage2_decoder.model import CaptionDecoder, DecoderConfig
from stage2_decoder.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from stage2_decoder.training.pairs import CaptionPairs

D = 32
START, END = 1, 2
BACKBONE = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "weights_sha256": None, "feature_dim": D,
            "preprocess": '{"crop": 224}'}

CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs playing with a red ball in the grass",
            "A plate of food with broccoli and rice.", "A red double decker bus driving down the street",
            "A cat sleeping on a laptop keyboard"]


def beam_search(model, features, beam_size: int = 3, max_len: int = 20, length_penalty: float = 0.0,
                min_len: int = 0, no_repeat_ngram: int = 0) -> list[list[int]]:
    """The best hypothesis per image (word ids, no <end>); with beam_size=1 it equals greedy."""
    cfg = DecodeConfig(beam_size, max_len, min_len, length_penalty, no_repeat_ngram)
    return [hyps[0][0] for hyps in beam_search_nbest(model, features, cfg)]


@pytest.fixture()
def vocab() -> Vocabulary:
    return build_vocab([tokenize(c) for c in CAPTIONS], threshold=1)


def _decoder(vocab_size: int, seed: int = 0, **kw) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(DecoderConfig(D, vocab_size, embed_size=16, hidden_size=32, **kw))


def _randomise(model: CaptionDecoder, out_scale: float = 8.0, end_bias: float = 0.0) -> CaptionDecoder:
    """Make a random decoder's outputs image-dependent and its BatchNorm running stats non-trivial."""
    tied = model.cfg.tie_embeddings
    with torch.no_grad():
        (model.out_proj if tied else model.out).weight.mul_(out_scale)
        (model.out_bias if tied else model.out.bias)[END] += end_bias
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _records(captions=CAPTIONS) -> list[ImageRecord]:
    return [ImageRecord(f"k{i}", i, f"/img/{i}.jpg", [c]) for i, c in enumerate(captions)]


# --- shapes and alignment ----------------------------------------------------------------------------------

def test_forward_shape(vocab):
    model = _decoder(len(vocab))
    pairs = CaptionPairs(_records(), {f"k{i}": i for i in range(5)}, vocab)
    b = pairs.gather(torch.arange(5), torch.randn(5, D))
    logits = model(b.features, b.inputs, b.lengths)
    assert logits.shape == (int(b.lengths.sum()), len(vocab))
    assert torch.isfinite(logits).all()


def test_batch_alignment_start_end(vocab):
    rows = {f"k{i}": 10 + i for i in range(5)}  # rows differ from record order on purpose
    pairs = CaptionPairs(_records(), rows, vocab)
    feats = torch.randn(20, D)
    idx = torch.tensor([3, 0, 4, 1, 2])
    b = pairs.gather(idx, feats)
    B, T = b.inputs.shape
    assert b.targets.shape == (B, T) and b.lengths.shape == (B,)
    idx = idx[b.order]  # gather puts the longest caption first
    assert torch.equal(b.features, feats[10 + idx])  # looked up by row, not by position
    assert (b.lengths[:-1] >= b.lengths[1:]).all()
    assert (b.inputs[:, 0] == START).all()
    for i in range(B):
        n = int(b.lengths[i])
        words = tokenize(CAPTIONS[int(idx[i])])
        assert n == len(words) + 1
        assert b.targets[i, n - 1] == END
        assert torch.equal(b.targets[i, : n - 1], b.inputs[i, 1:n])  # targets are inputs shifted by one
        assert vocab.decode(b.inputs[i, :n].tolist()) == words
        assert vocab.decode(b.targets[i, :n].tolist()) == words
        assert (b.inputs[i, n:] == 0).all() and (b.targets[i, n:] == 0).all()  # padding beyond the length
    assert (b.inputs != END).all()  # <end> is never fed as an input
    assert int(b.lengths.max()) == T


def test_caption_pairs_skips_uncached_and_empty(vocab):
    recs = _records() + [ImageRecord("gone", 99, "/img/gone.jpg", ["a dog"]),
                         ImageRecord("k5", 5, "/img/5.jpg", ["...", "a cat"])]
    pairs = CaptionPairs(recs, {**{f"k{i}": i for i in range(5)}, "k5": 5}, vocab)
    assert len(pairs) == 6
    row, ids = pairs[5]
    assert row == 5 and ids == vocab.encode(["a", "cat"])
    with pytest.raises(ValueError):
        CaptionPairs(recs[-2:-1], {}, vocab)


@pytest.mark.parametrize("tie", [False, True])
def test_teacher_forcing_matches_stepwise_decoding(vocab, tie):
    """What training optimises (forward) is what decoding computes (init_state + step), position by position."""
    model = _randomise(_decoder(len(vocab), tie_embeddings=tie))
    pairs = CaptionPairs(_records(), {f"k{i}": i for i in range(5)}, vocab)
    feats = torch.randn(5, D)
    b = pairs.gather(torch.arange(5), feats)
    with torch.no_grad():
        logits = model(b.features, b.inputs, b.lengths)  # packed order
        packed_inputs = pack_padded_sequence(b.inputs, b.lengths, batch_first=True, enforce_sorted=False)
        # rebuild per-image, per-position log-probs by stepping
        state = model.init_state(b.features)
        steps = []
        for t in range(b.inputs.shape[1]):
            logp, state = model.step(b.inputs[:, t], state)
            steps.append(logp)
        stepped = torch.stack(steps, 1)  # (B, T, V)
        stepped_packed = pack_padded_sequence(stepped, b.lengths, batch_first=True, enforce_sorted=False).data
    assert packed_inputs.data.shape[0] == logits.shape[0] == stepped_packed.shape[0]
    # compare over <end> and the words (step masks <pad>, <start> and <unk>)
    words = [vocab.end_id, *range(vocab.unk_id + 1, len(vocab))]
    want = torch.log_softmax(logits[:, words], -1)
    got = torch.log_softmax(stepped_packed[:, words], -1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- decoding ----------------------------------------------------------------------------------------------

def _scripted(model: CaptionDecoder, plans: list[list[int]], vocab_size: int):
    """Replace model.step by one that emits plans[i][t] for image i at step t (then <end> forever)."""
    calls = []

    def step(tokens, state):
        t = len(calls)
        calls.append(tokens.clone())
        logp = torch.full((tokens.shape[0], vocab_size), -20.0)
        for i in range(tokens.shape[0]):
            plan = plans[i]
            logp[i, plan[t] if t < len(plan) else END] = 0.0
        return logp, state

    model.step = step
    return calls


def test_greedy_stops_at_end(vocab):
    model = _decoder(len(vocab)).eval()
    calls = _scripted(model, [[5, END, 7, 7], [6, 7, 8, END]], len(vocab))
    out = greedy(model, torch.randn(2, D), max_len=20)
    assert out == [[5], [6, 7, 8]]
    assert len(calls) == 4  # stops as soon as every image has emitted <end>
    assert calls[0].tolist() == [START, START]
    assert calls[1].tolist() == [5, 6]  # each step is fed the previous argmax


def test_greedy_respects_max_len(vocab):
    model = _decoder(len(vocab)).eval()
    calls = _scripted(model, [[5] * 50], len(vocab))
    assert greedy(model, torch.randn(1, D), max_len=7) == [[5] * 7]
    assert len(calls) == 7


def test_decoders_never_return_end_or_start(vocab):
    for bias in (0.0, 1.25, 1.5, 2.0):
        model = _randomise(_decoder(len(vocab), seed=1), end_bias=bias)
        feats = torch.randn(12, D) * 3
        for ids in greedy(model, feats, max_len=15) + beam_search(model, feats, beam_size=3, max_len=15):
            assert END not in ids and START not in ids and len(ids) <= 15
            assert all(0 <= i < len(vocab) for i in ids)


def test_beam_size_one_equals_greedy(vocab):
    lengths = set()
    for seed, bias in [(0, 0.0), (0, 1.25), (0, 1.5), (1, 1.5), (2, 2.0)]:
        model = _randomise(_decoder(len(vocab), seed=seed), end_bias=bias)
        torch.manual_seed(100 + seed)
        feats = torch.randn(10, D) * 3
        g = greedy(model, feats, max_len=20)
        assert beam_search(model, feats, beam_size=1, max_len=20) == g
        lengths |= {len(x) for x in g}
    assert any(0 < n < 20 for n in lengths), "no case exercised an early <end>"
    assert 20 in lengths, "no case exercised max_len"


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, -1.0])
def test_greedy_scores_are_a_beam_of_ones_to_the_last_bit(vocab, length_penalty):
    """With a length penalty the greedy score was divided in float32 (torch) or by numpy's float32 power, the
    beam's in float64: one caption, three scores differing in the 8th digit by the options that chose the path."""
    import numpy as np

    from stage2_decoder.decoding import numpy_decode, sampling

    model = _randomise(_decoder(len(vocab), seed=3), end_bias=0.5)
    torch.manual_seed(7)
    feats = torch.randn(8, D) * 3
    cfg = DecodeConfig(1, 20, 1, length_penalty, 0)
    beam = beam_search_nbest(model, feats, cfg)
    assert sampling.greedy_scored(model, feats, 20, 1, length_penalty) == beam

    @torch.inference_mode()
    def step(tokens, h, c):  # the torch step as the ONNX graph serves it
        logp, (h, c) = model.step(torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c)))
        return logp.numpy().copy(), h.numpy(), c.numpy()

    with torch.inference_mode():
        h, c = (x.numpy() for x in model.init_state(feats))
    assert numpy_decode.greedy_scored(step, h, c, START, END, 20, 1, length_penalty) == beam
    assert len({len(hyps[0][0]) for hyps in beam}) > 1 and np.isfinite([hyps[0][1] for hyps in beam]).all()


def test_beam_search_finds_higher_likelihood_than_greedy(vocab):
    """A wider beam never returns a caption less likely than greedy's, under a plain-sum score."""
    model = _randomise(_decoder(len(vocab), seed=3), end_bias=0.5)
    feats = torch.randn(8, D) * 3

    def logprob(i, ids):
        state = model.init_state(feats[i:i + 1])
        tok, total = torch.tensor([START]), 0.0
        for w in ids + [END]:
            logp, state = model.step(tok, state)
            total += float(logp[0, w])
            tok = torch.tensor([w])
        return total

    g = greedy(model, feats, max_len=20)
    bs = beam_search(model, feats, beam_size=4, max_len=20, length_penalty=0.0)
    checked = 0
    with torch.no_grad():
        for i in range(8):
            if len(g[i]) < 20 and len(bs[i]) < 20:  # both finished with <end>
                assert logprob(i, bs[i]) >= logprob(i, g[i]) - 1e-4
                checked += 1
    assert checked >= 3


def test_batch_of_one_in_eval_mode(vocab):
    model = _randomise(_decoder(len(vocab), seed=2), end_bias=1.25)
    feats = torch.randn(6, D) * 3
    together = greedy(model, feats, max_len=20)
    assert len({tuple(c) for c in together}) > 1  # image-dependent, or the comparison proves nothing
    for i in range(6):
        assert greedy(model, feats[i:i + 1], max_len=20) == [together[i]]
        assert beam_search(model, feats[i:i + 1], beam_size=3, max_len=20) == \
            [beam_search(model, feats, beam_size=3, max_len=20)[i]]
    # and this is why eval mode matters: BatchNorm cannot normalise a single training example
    model.train()
    with pytest.raises(ValueError):
        model.image_embedding(feats[:1])


# --- checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip_identical_outputs(tmp_path, vocab, tie):
    model = _randomise(_decoder(len(vocab), seed=4, num_layers=2, dropout=0.1, tie_embeddings=tie), end_bias=1.25)
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, vocab, BACKBONE, epoch=3, history=[{"epoch": 3, "val_loss": 1.5}])
    assert not (tmp_path / "best.pt.tmp").exists()
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["backbone"] == BACKBONE and ckpt["history"][0]["val_loss"] == 1.5
    model2, vocab2 = model_from_checkpoint(ckpt)
    assert vocab2 == vocab and model2.cfg == model.cfg
    assert not model2.training
    feats = torch.randn(6, D) * 3
    assert greedy(model2, feats) == greedy(model, feats)
    assert beam_search(model2, feats, beam_size=3) == beam_search(model, feats, beam_size=3)
    pairs = CaptionPairs(_records(), {f"k{i}": i for i in range(5)}, vocab)
    b = pairs.gather(torch.arange(5), feats)
    with torch.no_grad():
        assert torch.equal(model2(b.features, b.inputs, b.lengths), model(b.features, b.inputs, b.lengths))
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_tied_output_layer_is_the_word_embedding(tmp_path, vocab):
    """--tie-embeddings: next-word logits are scored against the embedding matrix itself (no V x H output
    weight of its own), so changing one word's embedding moves that word's logit, and only its."""
    tied, untied = _decoder(len(vocab), tie_embeddings=True).eval(), _decoder(len(vocab)).eval()
    assert not hasattr(tied, "out") and "out.weight" not in tied.state_dict()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 32 * len(vocab) - (32 * 16 + 16)  # H*V weights out, H->E projection in
    feats, word = torch.randn(3, D), len(vocab) - 1
    state = tied.init_state(feats)
    before, _ = tied.step(torch.full((3,), START), state)
    with torch.no_grad():
        tied.embed.weight[word] += 1.0
    after, _ = tied.step(torch.full((3,), START), tied.init_state(feats))
    raw = lambda lp: lp - lp[:, 2:3]  # noqa: E731  log-probs relative to <end>'s: the softmax's shift cancels
    changed = (raw(after) - raw(before)).abs().amax(0) > 1e-6
    assert changed[word] and not changed[3:word].any()
    # a checkpoint written before the setting existed has no such key, and loads untied
    save_checkpoint(tmp_path / "old.pt", untied, vocab, BACKBONE)
    ckpt = load_checkpoint(tmp_path / "old.pt")
    del ckpt["decoder_config"]["tie_embeddings"]
    assert not model_from_checkpoint(ckpt)[0].cfg.tie_embeddings


@dataclasses.dataclass
class _NotPlain:
    payload: str = "arbitrary object"


def test_load_refuses_pickled_objects(tmp_path, vocab):
    p = tmp_path / "evil.pt"
    torch.save(_NotPlain(), p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    # a real checkpoint dict with one non-plain value smuggled in is refused too
    q = tmp_path / "smuggled.pt"
    save_checkpoint(q, _decoder(len(vocab)), vocab, BACKBONE, extra=_NotPlain())
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(q)


def test_load_refuses_text_and_empty_files(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("epoch 3: loss 1.23\n")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value)
    e = tmp_path / "empty.pt"
    e.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(e)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def _resave(src, dst, **changes):
    ckpt = torch.load(src, weights_only=True)
    ckpt.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del ckpt[k]
    torch.save(ckpt, dst)


def test_load_refuses_wrong_version_or_format(tmp_path, vocab):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _decoder(len(vocab)), vocab, BACKBONE)
    _resave(good, tmp_path / "v2.pt", version=2)
    with pytest.raises(CheckpointError, match="version 2"):
        load_checkpoint(tmp_path / "v2.pt")
    _resave(good, tmp_path / "fmt.pt", format="someone-elses-checkpoint")
    with pytest.raises(CheckpointError, match="not a capcache checkpoint"):
        load_checkpoint(tmp_path / "fmt.pt")
    _resave(good, tmp_path / "novocab.pt", vocab=None)
    with pytest.raises(CheckpointError, match="vocab"):
        load_checkpoint(tmp_path / "novocab.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pt")


def test_model_from_checkpoint_is_strict(tmp_path, vocab):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _decoder(len(vocab)), vocab, BACKBONE)
    ckpt = load_checkpoint(good)
    missing = dict(ckpt, model_state={k: v for k, v in ckpt["model_state"].items() if not k.startswith("bn.")})
    with pytest.raises(CheckpointError):
        model_from_checkpoint(missing)
    small = dict(ckpt, vocab=build_vocab([["a"]], threshold=1).to_dict())
    with pytest.raises(CheckpointError):
        model_from_checkpoint(small)
    bad_cfg = dict(ckpt, decoder_config={**ckpt["decoder_config"], "not_a_field": 1})
    with pytest.raises(CheckpointError):
        model_from_checkpoint(bad_cfg)


# --- learning ----------------------------------------------------------------------------------------------

def test_decoder_overfits_a_handful_of_captions(vocab):
    torch.manual_seed(0)
    feats = torch.randn(len(CAPTIONS), D)
    model = CaptionDecoder(DecoderConfig(D, len(vocab), embed_size=32, hidden_size=64))
    pairs = CaptionPairs(_records(), {f"k{i}": i for i in range(len(CAPTIONS))}, vocab)
    b = pairs.gather(torch.arange(len(CAPTIONS)), feats)
    targets = pack_padded_sequence(b.targets, b.lengths, batch_first=True, enforce_sorted=False).data
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(200):
        loss = F.cross_entropy(model(b.features, b.inputs, b.lengths), targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
    model.eval()
    want = [tokenize(c) for c in CAPTIONS]
    assert [vocab.decode(ids) for ids in greedy(model, feats)] == want
    assert [vocab.decode(ids) for ids in beam_search(model, feats, beam_size=3)] == want


def test_cpu_dropout_draws_no_bernoulli_and_keeps_its_distribution(vocab):
    """The decoder's dropout on the CPU: no `bernoulli_` (4x slower than uniform draws there), the
    same distribution as nn.Dropout (keep rate 1 - p, kept values scaled by 1 / (1 - p)), gradients
    through the same mask, the identity in eval mode; and a training forward of the decoder uses it."""
    from torch.profiler import ProfilerActivity, profile

    from stage2_decoder.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.full((400, 500), 2.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert torch.equal(drop.eval()(x), x)

    model = CaptionDecoder(DecoderConfig(D, len(vocab), 16, 24, dropout=0.5)).train()
    assert isinstance(model.drop, nn.Dropout)  # SCST's freeze (scst_mode) finds it as a dropout module
    inputs = torch.randint(3, len(vocab), (6, 7))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(6, D), inputs, torch.tensor([7, 6, 5, 5, 3, 2])).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::rand_like" in ops and not any("bernoulli" in op for op in ops), sorted(ops)
